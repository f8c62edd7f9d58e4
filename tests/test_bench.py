"""The benchmark's CPU mode runs in the suite, so the script cannot rot; its pass counts are checked exactly.

Every workflow runs once (no warm-up) at 2 steps with --cheap inner-iteration caps (null-text 2, MAG-Edit 2, DPL 2 + 2)
on the tiny models. The counts below are the algorithms' own formulas, so a regression in batching (P2P branches or
InstDiffEdit seeds no longer in one batch, an extra or missing UNet pass, MAG-Edit no longer stopping its guidance
passes early) fails here.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchmark  # noqa: E402

S = 2  # steps
N = M = K = J = 2  # --cheap: null-text, MAG-Edit, DPL token and DPL null-text iterations
SEEDS = 3


def run(tmp_path, *extra):
    out = tmp_path / "bench.md"
    results = benchmark.run(["--mode", "cpu", "--runs", "1", "--warmup", "0", "--steps", str(S), "--cheap",
                             "--out", str(out), *extra])
    return {r.name: r for r in results}, out.read_text()


def passes(r):
    return r.forwards, r.partial, r.rows, r.backwards


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return run(tmp_path_factory.mktemp("bench"))


def test_settings_scale_mag_edit_steps_and_cheap_caps():
    paper = benchmark.Settings(50)
    assert (paper.mag_guidance_steps, paper.mag_blend_steps, paper.mag_iterations) == (25, 15, 15)
    assert (benchmark.Settings(4).mag_guidance_steps, benchmark.Settings(4).mag_blend_steps) == (2, 1)
    cheap = benchmark.Settings.cheap(S)
    assert (cheap.null_text_iterations, cheap.mag_iterations, cheap.dpl_token_iterations,
            cheap.dpl_null_iterations, cheap.mag_guidance_steps) == (N, M, K, J, 1)


def test_every_sd15_workflow_runs_with_exact_unet_pass_counts(sd15):
    results, text = sd15
    assert set(results) == {w.name for w in benchmark.WORKFLOWS if "sd15" in w.families}
    r = results
    assert passes(r["plain KSampler (baseline)"]) == (S, 0, 2 * S, 0)  # cond + uncond batched
    # inversion pass cond-only (guidance 1), then the CFG reconstruction / direct offsets with both halves
    assert passes(r["DDIM inversion"]) == (2 * S, 0, 3 * S, 0)
    assert passes(r["direct inversion"]) == (2 * S, 0, 3 * S, 0)
    # null-text: DDIM pass + per step (cached cond pass + I uncond iterations with backward + final uncond pass)
    nt = r["null-text inversion"]
    iters = nt.details["null_text_iterations"]
    assert S <= iters <= N * S
    assert passes(nt) == (3 * S + iters, 0, 3 * S + iters, iters)
    assert (nt.counts.vae_encodes, nt.counts.vae_decodes) == (1, 1)  # encode the photo, decode for the PSNR
    # P2P: source and target branch with both CFG halves in ONE call per step (4 rows)
    assert passes(r["P2P edit (cached inversion)"]) == (S, 0, 4 * S, 0)
    assert r["P2P edit (cached inversion)"].counts.calls == [(4, False, False)] * S
    both = r["null-text + P2P (incl. inversion)"]
    i2 = both.details["null_text_iterations"]
    assert passes(both) == (3 * S + i2 + S, 0, 3 * S + i2 + 4 * S, i2)
    for name in ("CPAM object removal (cached inversion)", "EmbCtrl edit (cached inversion)"):
        assert passes(r[name]) == (S, 0, 4 * S, 0)


def test_mag_edit_costs_max_it_partial_passes_per_guided_step(sd15):
    results, _ = sd15
    g = benchmark.Settings.cheap(S).mag_guidance_steps
    cached = results["MAG-Edit guidance + edit (cached inversion)"]
    # each guided step: MAX_IT cond-only passes of both branches (2 rows), cut after the last 16x16 layer, each with
    # one backward; then the usual 4-row edit step
    assert passes(cached) == (S + g * M, g * M, 4 * S + 2 * g * M, g * M)
    guidance = [c for c in cached.counts.calls if c[1]]
    assert guidance == [(2, True, True)] * (g * M)
    full = results["MAG-Edit incl. null-text inversion"]
    i = full.details["null_text_iterations"]
    assert passes(full) == (3 * S + i + S + g * M, g * M, 3 * S + i + 4 * S + 2 * g * M, i + g * M)


def test_instdiffedit_batches_its_seeds_and_dpl_stays_within_its_caps(sd15):
    results, _ = sd15
    inst = results["InstDiffEdit (3 seeds + inpainting finish)"]
    mask_steps = int(S * 0.5)
    # mask phase: n seeds x (cond, uncond) in one call per step; finish: S calls of 2 rows on the inpainting UNet
    assert inst.counts.calls == [(2 * SEEDS, False, False)] * mask_steps + [(2, False, False)] * S
    assert (inst.counts.vae_encodes, inst.counts.vae_decodes) == (2, 1)  # photo, inpainting input; result
    dpl = results["DPL inversion + P2P edit"]
    updates, nt = dpl.details["token_updates"], dpl.details["null_text_iterations"]
    assert len(updates) == S and all(0 <= u <= K for u in updates) and S <= nt <= J * S
    evaluations = sum(u + (u < K) for u in updates)  # evaluate, test, update: one more evaluation when stopped early
    fwd = S + evaluations + 2 * S + nt  # DDIM pass, token evaluations, cond pass + final uncond pass per step, NT
    # the token evaluations end after the last 16x16 cross-attention layer (the losses read only those maps)
    assert passes(dpl) == (fwd + S, evaluations, fwd + 4 * S, sum(updates) + nt)
    evals = [c for c in dpl.counts.calls if c[1]]  # cond-only, one row; every update backpropagates its evaluation
    assert all(c[0] == 1 for c in evals) and sum(c[2] for c in evals) == sum(updates)
    assert dpl.counts.clip_backwards == sum(updates)  # the token rows are learned through the text encoder
    assert dpl.backwards <= S * (K + J)


def test_masafusion_and_attention_mask_pass_counts(sd15):
    results, _ = sd15
    direct = results["MaSaFusion + direct inversion (incl. inversion)"]
    # Alg. 1: five rows (source, t2i_bar, t2i, target_bar, target) x both CFG halves in one call per step
    assert passes(direct) == (3 * S, 0, 3 * S + 10 * S, 0)
    assert direct.counts.calls[-S:] == [(10, False, False)] * S
    nt = results["MaSaFusion + null-text inversion (incl. inversion)"]
    i = nt.details["null_text_iterations"]
    assert passes(nt) == (3 * S + i + S, 0, 3 * S + i + 10 * S, i)
    # DDIM inversion at cfg 1: both passes cond-only
    assert passes(results["mask from attention (incl. DDIM inversion)"]) == (2 * S, 0, 2 * S, 0)


def test_results_file_and_count_based_estimate(sd15, tmp_path):
    results, text = sd15
    assert "<!-- bench:cpu-sd15-2steps-cheap -->" in text and "| DPL inversion + P2P edit |" in text
    assert "--out" not in text  # the recorded command is the same wherever the section was written
    assert "time / KSampler" in text and "est. H100 eager (s)" in text and "est. H100 graph (s)" in text and "CPU time (s)" in text
    assert results["plain KSampler (baseline)"].cpu_ratio == 1.0
    # the estimate is the stated per-call model: 2 CFG calls of 2 rows at the 40 ms floor, 2 text encodes at 5 ms
    base = results["plain KSampler (baseline)"].counts
    assert benchmark.estimate_seconds(base, "sd15") == pytest.approx((2 * 40 + 2 * 5) / 1000)
    # as CUDA graphs the 10 ms floor no longer binds: 2 rows x 8 ms of compute per call
    assert benchmark.estimate_seconds(base, "sd15", graph=True) == pytest.approx((2 * 16 + 2 * 5) / 1000)
    assert benchmark.estimate_seconds(base, "sd15", launch_factor=1.5) == pytest.approx((2 * 60 + 2 * 5) / 1000)
    # sections are replaced in place, the rest of the file is kept
    path = tmp_path / "b.md"
    path.write_text("intro\n\n<!-- bench:x -->\nold\n<!-- /bench:x -->\n\ntail\n")
    benchmark.write_section(str(path), "x", "new")
    benchmark.write_section(str(path), "y", "other")
    assert path.read_text() == "intro\n\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\n\ntail\n\n<!-- bench:y -->\nother\n" \
                               "<!-- /bench:y -->\n"


def test_sdxl_rows_run_on_the_tiny_sdxl_model(tmp_path):
    results, text = run(tmp_path, "--family", "sdxl")
    assert set(results) == {"plain KSampler (baseline)", "null-text inversion", "P2P edit (cached inversion)",
                            "MAG-Edit incl. null-text inversion"}
    assert passes(results["P2P edit (cached inversion)"]) == (S, 0, 4 * S, 0)
    mag = results["MAG-Edit incl. null-text inversion"]
    i, g = mag.details["null_text_iterations"], benchmark.Settings.cheap(S).mag_guidance_steps
    assert passes(mag) == (3 * S + i + S + g * M, g * M, 3 * S + i + 4 * S + 2 * g * M, i + g * M)
    assert results["plain KSampler (baseline)"].counts.clip_forwards == 2 * 2  # clip_l and clip_g per encode
    assert "<!-- bench:cpu-sdxl-2steps-cheap -->" in text


# ------------------------------------------------------------------------------------------------ optimisations
def test_attention_calls_take_sigma_from_the_run_not_from_the_device_tensor():
    """_make_call must not read extra_options["sigmas"] (a GPU tensor: one sync per attention call) when the
    denoiser has put the sigma on the run."""
    import torch
    from conftest import pkg

    hooks, keys, run_mod = pkg("attention.hooks"), pkg("attention.keys"), pkg("attention.run")

    class DeviceSigmas:
        def __getitem__(self, i):
            raise AssertionError("read the device sigma tensor")

    sigmas = torch.tensor([14.6, 3.0, 0.0])
    run = run_mod.RunState(sigmas, ("source",))
    run.sigma = 3.0
    q = k = v = torch.zeros(2, 4, 8)
    options = {"n_heads": 2, "original_shape": (2, 4, 2, 2), "block": ("input", 1), "block_index": 0,
               "cond_or_uncond": [1, 0], "sigmas": DeviceSigmas(), keys.RUN: run}
    call = hooks._make_call(q, k, v, options, "self")
    assert call.sigma == 3.0 and call.step == 1
    run.sigma = None  # outside a denoiser call (foreign samplers): the host tensor is read as before
    options["sigmas"] = torch.tensor([14.6])
    assert hooks._make_call(q, k, v, options, "self").step == 0


def test_run_sigma_equals_the_host_sigma_tensor_in_every_attention_call(tiny, monkeypatch):
    """On a real chain (inversion, P2P + MAG-Edit edit) the denoiser's sigma is bit-identical to the host tensor."""
    import torch
    from conftest import call_node, make_image, pkg

    hooks, keys = pkg("attention.hooks"), pkg("attention.keys")
    original, seen = hooks._make_call, []

    def checked(q, k, v, extra_options, kind):
        run, host = extra_options.get(keys.RUN), extra_options.get("sigmas")
        if run is not None and host is not None:
            seen.append(run.sigma is not None and bool(torch.all(host == run.sigma)))
        return original(q, k, v, extra_options, kind)

    monkeypatch.setattr(hooks, "_make_call", checked)
    image = make_image(128)
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=benchmark.SOURCE,
                    method="null_text", steps=2, cfg=7.5, image=image, vae=tiny.vae, inner_steps=1)[0]
    hook = call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=benchmark.SOURCE,
                     target_prompt=benchmark.MAG_TARGET, mode="refine", cross_replace=0.8, self_replace=0.5)[0]
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1.0
    guided = call_node("AttnEditMAGGuidance", model=hook, inversion=inv, mask=mask, target_words="white",
                       constraint="token_ratio", max_iterations=1, guidance_steps=1, scale=2.5, blend_steps=1)[0]
    call_node("AttnEditEditSampler", model=guided, inversion=inv)
    assert len(seen) > 100 and all(seen)


def test_op_counting_finds_no_tensor_reads_per_attention_call(tmp_path):
    """--count-ops: aten ops inside UNet forwards and tensor -> Python reads. Reading the sigma tensor in every
    attention call (a GPU sync each; 32 calls per SD1.x forward) would add ~30 reads per forward."""
    results, text = run(tmp_path, "--only", "DDIM", "--count-ops")
    base, ddim = results["plain KSampler (baseline)"], results["DDIM inversion"]
    assert ddim.scalar_reads < 8 * ddim.forwards
    assert base.ops_per_forward > 500 and ddim.ops_per_forward == pytest.approx(base.ops_per_forward, rel=0.1)
    assert ddim.launch_factor >= 1.0 and "aten ops / UNet fwd | scalar reads |" in text


@pytest.mark.newer_host("Flux exists only in ComfyUI 0.3.x")
def test_flux_rows_count_the_flow_solvers_passes(tmp_path):
    """Tiny Flux, cfg 1 (one chunk): RF-Solver asks the model twice per step in the inversion and in the
    reconstruction; the edits carry source and target in one batch (2 rows) with the inversion's solver; flow_euler
    once per step."""
    results, text = run(tmp_path, "--family", "flux")
    assert set(results) == {w.name for w in benchmark.WORKFLOWS if "flux" in w.families}
    r = results
    assert passes(r["plain KSampler (baseline)"]) == (S, 0, S, 0)
    assert passes(r["Flux RF-Solver inversion"]) == (4 * S, 0, 4 * S, 0)
    assert passes(r["Flux P2P word swap + local blend (cached inversion)"]) == (2 * S, 0, 4 * S, 0)
    assert passes(r["Flux CPAM background kept (cached inversion)"]) == (2 * S, 0, 4 * S, 0)
    assert passes(r["Flux mask from attention (incl. flow_euler inversion)"]) == (2 * S, 0, 2 * S, 0)
    assert "<!-- bench:cpu-flux-2steps-cheap -->" in text
