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
    dpl = results["DPL inversion + P2P edit"]
    updates, nt = dpl.details["token_updates"], dpl.details["null_text_iterations"]
    assert len(updates) == S and all(0 <= u <= K for u in updates) and S <= nt <= J * S
    evaluations = sum(u + (u < K) for u in updates)  # evaluate, test, update: one more evaluation when stopped early
    fwd = S + evaluations + 2 * S + nt  # DDIM pass, token evaluations, cond pass + final uncond pass per step, NT
    assert passes(dpl) == (fwd + S, 0, fwd + 4 * S, sum(updates) + nt)
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
    assert "<!-- bench:cpu-sd15 -->" in text and "| DPL inversion + P2P edit |" in text
    assert "time / KSampler" in text and "est. H100 (s)" in text
    assert results["plain KSampler (baseline)"].cpu_ratio == 1.0
    # the estimate is the stated per-call model: 2 CFG calls of 2 rows at the 40 ms floor, 2 text encodes at 5 ms
    base = results["plain KSampler (baseline)"].counts
    assert benchmark.estimate_seconds(base, "sd15") == pytest.approx((2 * 40 + 2 * 5) / 1000)
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
    assert "<!-- bench:cpu-sdxl -->" in text
