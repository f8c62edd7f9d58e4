"""MaSaFusion (Alg. 1, Eq. 9-10; Alg. 5, Eq. 14) on real ComfyUI machinery with a tiny random T2I-Adapter built from
ComfyUI's own adapter class (tiny model, CPU)."""

import copy

import pytest
import torch
from conftest import call_node, make_image, make_latent, pkg

SRC = "a photo of a cat"
TGT = "a photo of a dog"
STEPS = 5
SIZE = 16  # latent; images and hints are 8x

fusion = pkg("attention.fusion")
inv_fusion = pkg("inversion.fusion")
run_mod = pkg("attention.run")
hooks = pkg("attention.hooks")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def adapter_net():
    import tiny_models

    with torch.inference_mode():
        return tiny_models.make_t2i_adapter()


@pytest.fixture(scope="module")
def inversions(tiny):
    out = {}
    for method in ("direct", "null_text"):
        out[method] = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method=method,
                                steps=STEPS, cfg=7.5, latent=make_latent(size=SIZE, seed=4), inner_steps=2)[0]
    return out


def adapter_cond(tiny, net, hint_seed=0, strength=1.0):
    import nodes

    cond = pkg("inversion.comfy_model").encode_text(tiny.clip, TGT)
    hint = make_image(SIZE * 8, seed=hint_seed)
    with torch.inference_mode():
        return nodes.ControlNetApply().apply_controlnet(cond, net, hint, strength)[0]


def region(kind="box"):
    m = torch.zeros(1, SIZE * 8, SIZE * 8)
    if kind == "box":
        m[:, 32:96, 40:104] = 1.0
    elif kind == "full":
        m[:] = 1.0
    return m


def run_node(tiny, inversion, adapter=None, mask=None, **kw):
    args = dict(model=tiny.model, clip=tiny.clip, inversion=inversion, target_prompt=TGT,
                mask=region() if mask is None else mask, seed=kw.pop("seed", 7), start_step=kw.pop("start_step", 0),
                layers=kw.pop("layers", "all"))
    if adapter is not None:
        args["adapter"] = adapter
    args.update(kw)
    target, intermediate, source = call_node("AttnEditFusionWithAdapter", **args)
    return target["samples"], intermediate["samples"], source["samples"]


# ------------------------------------------------------------------------------------------------ pure maths
def test_region_blend_and_initial_target_are_the_indicator_mix():
    bar, hat = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 5.0)
    area = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    expected = torch.tensor([[[[5.0, 1.0], [1.0, 5.0]]]]).expand(2, 1, 2, 2)
    assert torch.equal(inv_fusion.region_blend(bar, hat, area), expected)
    assert torch.equal(inv_fusion.initial_target(bar, hat, area), expected)
    assert torch.equal(inv_fusion.intermediate_start(torch.ones(2), 3.0), torch.full((2,), 3.0))


class RowwiseDenoiser:
    """Analytic denoiser: each row's x0 depends only on its own latent and its own contexts (like a UNet row)."""

    def __init__(self, roles, steps=4):
        self.run = run_mod.RunState(torch.linspace(4.0, 0.0, steps + 1), tuple(roles))
        self.contexts = []

    def __call__(self, x, sigma, context=None):
        context = context or {}
        self.contexts.append(context)
        shift = sum(c.mean((1, 2)).view(-1, 1, 1, 1) * (label + 1) for label, c in context.items())
        return 0.6 * x + 0.1 * x.roll(1, -1) + shift


@pytest.mark.parametrize("layout_name", ["ALG1", "ALG5"])
def test_fusion_loop_with_empty_region_follows_the_source_exactly(layout_name):
    """Eq. 10/14 with A empty: every target step uses eps_bar, which sees the source's latent and contexts, and the
    direct-inversion offsets reach the target on A^c, so the target stream equals the source stream bit for bit."""
    layout = getattr(inv_fusion, layout_name)
    den = RowwiseDenoiser(layout.roles)
    sigmas = den.run.sigmas
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(5, 4, 6, 6, generator=g)
    branch = pkg("inversion.edit").SourceBranch(latents, uncond=torch.randn(4, 7, 3, generator=g),
                                                 offsets=torch.randn(4, 4, 6, 6, generator=g))
    negative = torch.randn(1, 7, 3, generator=g)
    positive = torch.randn(len(layout.roles), 7, 3, generator=g)
    context = inv_fusion.row_contexts(layout, branch, negative, positive)
    noise = torch.randn(4, 6, 6, generator=g) * 4.0
    streams = torch.stack([latents[0], noise, latents[0]][-layout.streams:] if layout.streams == 3
                          else [latents[0], latents[0]])
    empty = torch.zeros(1, 1, 6, 6)
    final = inv_fusion.fusion_loop(den, streams.clone(), sigmas, layout, empty, branch, context)
    assert torch.equal(final[layout.target_stream], final[0])
    # the source stream is pinned to the inversion path by the offsets: x_{i+1} = DDIM(x_i) + d_i
    x = latents[0]
    for i in range(4):
        ctx = {1: branch.uncond[i][None]}
        x = pkg("inversion.ddim").ddim_step(x, den(x[None], float(sigmas[i]), context=ctx)[0], float(sigmas[i]),
                                            float(sigmas[i + 1])) + branch.offsets[i]
    assert torch.allclose(final[0], x, atol=1e-6)
    # contexts: C^S rows (source, eps_bar) read the per-step null text, the t2i / target rows the plain negative
    rows = den.contexts[0][1]
    for j, role in enumerate(layout.roles):
        expected = branch.uncond[0] if role in fusion.SOURCE_PROMPT_ROLES else negative[0]
        assert torch.equal(rows[j], expected)
    # with A = everything the target is the eps_hat row alone and gets no offsets
    full = torch.ones(1, 1, 6, 6)
    den2 = RowwiseDenoiser(layout.roles)
    final_full = inv_fusion.fusion_loop(den2, streams.clone(), sigmas, layout, full, branch, context)
    assert not torch.allclose(final_full[layout.target_stream], final[layout.target_stream])


def attention(q, k, v, heads):
    """Plain softmax attention in float64 (independent of the package)."""
    r, n, hd = q.shape
    d = hd // heads
    qh = q.double().view(r, n, heads, d).transpose(1, 2)
    kh = k.double().view(r, -1, heads, d).transpose(1, 2)
    vh = v.double().view(r, -1, heads, d).transpose(1, 2)
    p = (qh @ kh.transpose(-1, -2) / d**0.5).softmax(-1)
    return (p @ vh).transpose(1, 2).reshape(r, n, hd), p


def synthetic_call(roles, labels=(1, 0), step=2, level=1, block="output", heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = len(roles) * len(labels)
    q, k, v = (torch.randn(rows, 16, 8, generator=g) for _ in range(3))
    run = run_mod.RunState(torch.linspace(10, 0, STEPS + 1), tuple(roles))
    layers = pkg("attention.layers")
    layout = run_mod.BatchLayout.from_call(rows, list(labels))
    return run_mod.AttnCall(q, k, v, heads, "self", layers.AttnSite(block, 7, 0, level), (4, 4), layout, run,
                            float(run.sigmas[step]))


@pytest.mark.parametrize("labels", [(1, 0), (0,), (0, 1)])
def test_alg1_controller_output_and_probs_match_hand_attention(labels):
    roles = fusion.ALG1_ROLES
    call = synthetic_call(roles, labels)
    ctrl = fusion.MaskedSelfAttentionFusion(fusion.ALG1_SOURCES)
    own, own_p = attention(call.q, call.k, call.v, call.heads)
    out = ctrl.edit_output(call, own.float())
    probs = ctrl.edit_probs(call, own_p.float())
    for chunk in range(len(labels)):
        row = {r: chunk * len(roles) + i for i, r in enumerate(roles)}
        s, tb, t, b, tt = (row[r] for r in roles)
        # eps_bar rows: Attention(Q^S, K^S, V^S), the source's own output and map (Eq. 9)
        for bar in (tb, b):
            assert torch.allclose(out[bar], own[s].float(), atol=1e-6)
            assert torch.allclose(probs[bar], own_p[s].float(), atol=1e-6)
        # eps_hat row: Attention(Q^t2i, K^t2i, V^T) (Eq. 10): the intermediate's map on the target's values
        expected, _ = attention(call.q[[t]], call.k[[t]], call.v[[tt]], call.heads)
        assert torch.allclose(out[tt], expected[0].float(), atol=1e-5)
        assert torch.allclose(probs[tt], own_p[t].float(), atol=1e-6)
        # the source and the intermediate keep their own attention
        for keep in (s, t):
            assert torch.allclose(out[keep], own[keep].float(), atol=1e-6)


def test_alg5_controller_is_mutual_self_attention_on_the_target():
    roles = fusion.ALG5_ROLES
    call = synthetic_call(roles)
    ctrl = fusion.MaskedSelfAttentionFusion(fusion.ALG5_SOURCES)
    own, own_p = attention(call.q, call.k, call.v, call.heads)
    out = ctrl.edit_output(call, own.float())
    probs = ctrl.edit_probs(call, own_p.float())
    for chunk in range(2):
        s, b, t = (chunk * 3 + i for i in range(3))
        expected, expected_p = attention(call.q[[t]], call.k[[s]], call.v[[s]], call.heads)  # Eq. 13: (Q^T, K^S, V^S)
        assert torch.allclose(out[t], expected[0].float(), atol=1e-5)
        assert torch.allclose(probs[t], expected_p[0].float(), atol=1e-5)
        assert torch.allclose(out[b], own[s].float(), atol=1e-6)


def test_controller_gating_by_step_kind_and_layers():
    ctrl = fusion.MaskedSelfAttentionFusion(fusion.ALG1_SOURCES, start_step=2, layers="decoder")
    assert ctrl.active(synthetic_call(fusion.ALG1_ROLES, step=2, level=1, block="output"))
    assert not ctrl.active(synthetic_call(fusion.ALG1_ROLES, step=1, level=1, block="output"))
    assert not ctrl.active(synthetic_call(fusion.ALG1_ROLES, step=3, level=1, block="input"))
    assert not ctrl.active(synthetic_call(fusion.ALG1_ROLES, step=3, level=4, block="output"))
    every = fusion.MaskedSelfAttentionFusion(fusion.ALG1_SOURCES)
    assert every.active(synthetic_call(fusion.ALG1_ROLES, step=0, level=8, block="middle"))
    cross = synthetic_call(fusion.ALG1_ROLES)
    cross.kind = "cross"
    assert not every.active(cross)
    assert not every.active(synthetic_call(("source", "target")))  # a run without fusion roles


def test_control_rows_are_zeroed_outside_the_kept_roles():
    feats = torch.randn(10, 3, 4, 4)
    control = {"input": [None, feats, feats[:1]], "middle": [], "output": []}
    keep = torch.tensor([False, True, True, False, False] * 2)
    out = hooks.keep_control_rows(control, keep)
    assert out["input"][0] is None and control["input"][1] is feats  # the host's containers are untouched
    assert torch.equal(out["input"][1][keep], feats[keep]) and not out["input"][1][~keep].any()
    assert out["input"][2].shape[0] == 10 and not out["input"][2][~keep].any()
    assert torch.equal(out["input"][2][keep], feats[:1].expand(10, -1, -1, -1)[keep])


# ------------------------------------------------------------------------------------------------ integration
@pytest.mark.parametrize("method", ["direct", "null_text"])
def test_empty_region_returns_the_source_reconstruction(tiny, inversions, adapter_net, method):
    empty = torch.zeros(1, 64, 64)
    inv = inversions[method]
    target, intermediate, source = run_node(tiny, inv, adapter_cond(tiny, adapter_net), mask=empty,
                                            adapter_on_target=False)
    # Exact in maths (see the loop test above); in one UNet batch, rows with equal inputs differ by ~1e-5 (the CPU
    # attention kernel chunks the batch), which the random tiny model amplifies over the steps. A wrong target (no
    # offsets, adapter or target prompt leaking) differs by tens here.
    assert torch.allclose(target, source, atol=5e-2, rtol=0)
    assert not torch.allclose(intermediate, source, atol=1e-2)
    # the source branch is the Invert node's reconstruction (direct: exact path; null-text: optimised path)
    recon = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method=method,
                      steps=STEPS, cfg=7.5, latent=make_latent(size=SIZE, seed=4), inner_steps=2)[3]["samples"]
    assert torch.allclose(source, recon, atol=1e-1, rtol=0)  # same batch-noise caveat (values up to ~3.5)
    # adapter-free variant (Alg. 5) too
    target5, _, source5 = run_node(tiny, inv, None, mask=empty)
    assert torch.allclose(target5, source5, atol=5e-2, rtol=0)


def test_the_tiny_adapter_drives_the_intermediate_only(tiny, inversions, adapter_net):
    inv = inversions["direct"]
    t1, i1, s1 = run_node(tiny, inv, adapter_cond(tiny, adapter_net, hint_seed=1))
    t2, i2, s2 = run_node(tiny, inv, adapter_cond(tiny, adapter_net, hint_seed=2))
    assert float((i1 - i2).abs().max()) > 1e-2, "a different hint must change the intermediate image"
    assert not torch.allclose(t1, t2, atol=1e-3), "the target borrows the intermediate's attention inside A"
    assert torch.equal(s1, s2), "the adapter must not reach the source branch"
    # strength 0: Apply ControlNet passes the prompt through -> the adapter-free variant (no intermediate image)
    t0, i0, s0 = run_node(tiny, inv, adapter_cond(tiny, adapter_net, hint_seed=1, strength=0.0))
    t5, _, _ = run_node(tiny, inv, None)
    assert torch.equal(i0, s0) and torch.equal(t0, t5)


def test_adapter_reaches_the_target_rows_by_default(tiny, inversions, adapter_net):
    """Alg. 1 line 8 / Eq. 10: the target's passes carry C^t2i. By default (unset input) the adapter reaches the
    target rows; adapter_on_target off keeps it on the intermediate only."""
    inv = inversions["direct"]
    empty = torch.zeros(1, 64, 64)
    cond = adapter_cond(tiny, adapter_net, hint_seed=1)
    default, _, source = run_node(tiny, inv, cond, mask=empty)
    assert not torch.allclose(default, source, atol=1e-3)
    explicit, _, _ = run_node(tiny, inv, cond, mask=empty, adapter_on_target=True)
    assert torch.equal(default, explicit)
    off, _, _ = run_node(tiny, inv, cond, mask=empty, adapter_on_target=False)
    assert torch.allclose(off, source, atol=5e-2, rtol=0) and not torch.allclose(off, default, atol=1e-3)
    node = pkg("nodes.fusion").AttnEditFusionWithAdapter
    assert node.INPUT_TYPES()["optional"]["adapter_on_target"][1]["default"] is True


class Recorder(run_mod.Controller):
    """Test controller installed after the fusion: sees q/k/v and the fused output of every self-attention call."""

    EDITS_OUTPUT = True

    def __init__(self):
        self.calls = []

    def active(self, call):
        return call.kind == "self" and call.run is not None

    def edit_output(self, call, out):
        self.calls.append((call.layout, call.run.roles, call.heads, call.q.clone(), call.k.clone(), call.v.clone(),
                           out.clone(), call.site.level))
        return out


def fused_run(tiny, inv, model_patch, adapter=None, capture=None):
    comfy_model = pkg("inversion.comfy_model")
    with_adapter = adapter is not None
    sources = fusion.ALG1_SOURCES if with_adapter else fusion.ALG5_SOURCES
    model = hooks.add_controller(tiny.model, fusion.MaskedSelfAttentionFusion(sources))
    if model_patch is not None:
        model = hooks.add_controller(model, model_patch)
    target = comfy_model.encode_text(tiny.clip, TGT)
    area = (region()[:, ::8, ::8] > 0.5).float()[None]
    noise = torch.randn(4, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) if with_adapter else None
    control = adapter[0][1]["control"] if with_adapter else None
    with torch.inference_mode():
        return inv_fusion.fuse_image(model, inv, 0, target, area, noise, control,
                                     frozenset({fusion.T2I_BAR, fusion.T2I}), capture=capture)


def test_target_self_attention_inside_A_is_the_intermediates(tiny, inversions, adapter_net):
    """Eq. 10: the target's eps_hat row uses softmax(Q^t2i K^t2i) on V^T at every layer and step; eps_bar rows use
    the source's self-attention; captured maps show exactly the intermediate's probabilities."""
    recorder = Recorder()
    capture = run_mod.CaptureSpec(cross_levels=frozenset(), self_levels=frozenset({2, 4}),
                                  labels=frozenset({0, 1}), live=True, accumulate=False)
    final, layout, captured = fused_run(tiny, inversions["direct"], recorder, adapter_cond(tiny, adapter_net),
                                        capture)
    assert len(recorder.calls) == STEPS * 16  # every self-attention layer of every step went through the fusion
    roles = fusion.ALG1_ROLES
    for lay, run_roles, heads, q, k, v, out, _level in recorder.calls:
        assert run_roles == roles
        for label in set(lay.labels):
            for chunk in lay.chunks(label):
                s, tb, t, b, tt = (lay.row(chunk, i) for i in range(5))
                expected, _ = attention(q[[t]], k[[t]], v[[tt]], heads)
                assert torch.allclose(out[tt].double(), expected[0], atol=1e-4)
                assert torch.equal(out[tb], out[s]) and torch.equal(out[b], out[s])
    assert captured.live, "self-attention maps were captured"
    for live in captured.live:
        probs = live.probs.view(len(live.labels), 5, *live.probs.shape[1:])
        assert torch.allclose(probs[:, 4], probs[:, 2], atol=1e-6)  # target == intermediate (inside A and out)
        assert torch.allclose(probs[:, 1], probs[:, 0], atol=1e-6) and torch.allclose(probs[:, 3], probs[:, 0])
        assert not torch.allclose(probs[:, 4], probs[:, 0], atol=1e-4)  # ... and not the source's
    assert final.shape == (3, 4, SIZE, SIZE) and layout.target_stream == 2


def test_alg5_target_attends_to_the_source_keys_and_values(tiny, inversions):
    recorder = Recorder()
    fused_run(tiny, inversions["direct"], recorder)
    assert len(recorder.calls) == STEPS * 16
    for lay, run_roles, heads, q, k, v, out, _level in recorder.calls:
        assert run_roles == fusion.ALG5_ROLES
        for chunk in range(len(lay.labels)):
            s, b, t = (lay.row(chunk, i) for i in range(3))
            expected, _ = attention(q[[t]], k[[s]], v[[s]], heads)
            assert torch.allclose(out[t].double(), expected[0], atol=1e-4)
            assert torch.equal(out[b], out[s])


def test_fusion_after_the_last_step_equals_plain_region_split_sampling(tiny, inversions, caplog):
    """start_step past the schedule: no substitution at all (and a warning naming the knob); then each stream is the
    plain eps of its prompt split by A (a different sampler built from the engine's pieces must agree bit for bit)."""
    inv = inversions["direct"]
    with caplog.at_level("WARNING"):
        target, _, source = run_node(tiny, inv, None, start_step=1000)
    assert "`start_step` 1000 is step 100 of this 5-step run" in caplog.text
    comfy_model = pkg("inversion.comfy_model")
    tgt_cond = comfy_model.encode_text(tiny.clip, TGT)
    area = (region()[:, ::8, ::8] > 0.5).float()[None]
    previews = []
    with torch.inference_mode():
        final, layout, _ = inv_fusion.fuse_image(tiny.model, inv, 0, tgt_cond, area, None,
                                                 progress=lambda n, x0: previews.append((n, x0)))
    raw = comfy_model.latent_to_raw(tiny.model, final)
    assert torch.equal(raw[layout.target_stream], target[0]) and torch.equal(raw[0], source[0])
    # one progress unit per step, previewing one stream's x0 (the target's)
    assert [n for n, _ in previews] == [1] * 5 and all(x0.shape == (1, *final.shape[1:]) for _, x0 in previews)
    fused, _, _ = run_node(tiny, inv, None)
    assert not torch.allclose(fused, target, atol=1e-4)


def test_fusion_samples_a_latent_of_one_row_per_role_in_the_inversions_latent_shape(tiny, inversions, monkeypatch):
    """The sampler's latent (its noise shape for ComfyUI's conditioning) is [rows, C, h, w], as a batch of images."""
    comfy_model = pkg("inversion.comfy_model")
    real, shapes = comfy_model.run_sampler, []

    def spy(model, positive, negative, latent, *args, **kwargs):
        shapes.append(tuple(latent.shape))
        return real(model, positive, negative, latent, *args, **kwargs)

    monkeypatch.setattr(comfy_model, "run_sampler", spy)
    inv = inversions["direct"]
    area = (region()[:, ::8, ::8] > 0.5).float()[None]
    with torch.inference_mode():
        inv_fusion.fuse_image(tiny.model, inv, 0, comfy_model.encode_text(tiny.clip, TGT), area, None)
    assert shapes == [(3, *inv.latents.shape[2:])] and len(inv.latents.shape[2:]) == 3


def test_alg1_starts_from_the_source_latent_sigma_0_times_the_noise_and_their_region_mix(tiny, inversions,
                                                                                          monkeypatch):
    """Alg. 1 lines 4 and 7: x_T^S from the inversion, x_T^t2i = sigma_0 x (ComfyUI's model space), x_T^T = 1_{A^c}
    x_T^S + 1_A x_T^t2i."""
    comfy_model = pkg("inversion.comfy_model")
    real, starts = inv_fusion.fusion_loop, []

    def spy(den, streams, *args, **kwargs):
        starts.append(streams.clone())
        return real(den, streams, *args, **kwargs)

    monkeypatch.setattr(inv_fusion, "fusion_loop", spy)
    inv = inversions["direct"]
    area = (region()[:, ::8, ::8] > 0.5).float()[None]
    noise = torch.randn(inv.latents.shape[2:], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        inv_fusion.fuse_image(tiny.model, inv, 0, comfy_model.encode_text(tiny.clip, TGT), area, noise)
    (streams,) = starts
    assert torch.equal(streams[0], inv.latents[0, 0])  # latents[0]: the inverted noise latent, image 0
    assert torch.allclose(streams[1], noise * float(inv.sigmas[0]))
    assert torch.allclose(streams[2], torch.where(area[0].bool(), streams[1], streams[0]), atol=1e-6)
    assert 0 < area.mean() < 1


def test_node_leaves_the_model_untouched_and_repeats(tiny, inversions, adapter_net):
    before = copy.deepcopy(tiny.model.model_options)
    cond = adapter_cond(tiny, adapter_net)
    first = run_node(tiny, inversions["direct"], cond)
    other = run_node(tiny, inversions["direct"], cond, seed=8)
    again = run_node(tiny, inversions["direct"], cond)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    assert tiny.model.model_options == before


def test_image_batch_is_fused_image_by_image(tiny):
    latents = make_latent(size=SIZE, batch=2, seed=6)
    inv2 = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=STEPS, cfg=7.5, latent=latents)[0]
    masks = torch.stack([region()[0], region("full")[0]])
    both, _, _ = run_node(tiny, inv2, None, mask=masks)
    for i in range(2):
        single = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                           steps=STEPS, cfg=7.5, latent={"samples": latents["samples"][i:i + 1]})[0]
        alone, _, _ = run_node(tiny, single, None, mask=masks[i:i + 1])
        assert torch.allclose(alone[0], both[i], atol=1e-5)


def test_cond_and_uncond_in_separate_calls_match_batched(tiny, inversions, adapter_net, monkeypatch):
    import comfy.model_management

    cond = adapter_cond(tiny, adapter_net)
    batched = run_node(tiny, inversions["null_text"], cond)
    real = comfy.model_management.get_free_memory

    def no_room_for_batching(dev=None, torch_free_too=False):
        return real(dev, torch_free_too) if torch_free_too else 0

    monkeypatch.setattr(comfy.model_management, "get_free_memory", no_room_for_batching)
    split = run_node(tiny, inversions["null_text"], cond)
    for a, b in zip(batched, split):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"mask": torch.zeros(3, 64, 64)}, "`mask` has a batch of 3 masks for 1 image"),
    ({"source_prompt": "a photo of a bird"}, "differs from the prompt the inversion was made with"),
    ({"layers": "middle"}, "`layers` 'middle' is unknown"),
])
def test_bad_inputs_are_clear_errors(tiny, inversions, change, message):
    with pytest.raises(ValueError, match=r"\[Attention Edit\] MaSaFusion.*" + message.replace("(", r"\(")):
        run_node(tiny, inversions["direct"], **change)


def test_a_patched_model_is_rejected(tiny, inversions):
    patched, _ = call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                           target_prompt=TGT, mode="replace", cross_replace=0.8, self_replace=0.4)
    with pytest.raises(ValueError, match="already patched by Attention Edit nodes"):
        call_node("AttnEditFusionWithAdapter", model=patched, clip=tiny.clip, inversion=inversions["direct"],
                  target_prompt=TGT, mask=region(), seed=0, start_step=0, layers="all")


def test_one_adapter_hint_per_image_is_split_image_by_image(tiny, adapter_net):
    import nodes

    node_module = pkg("nodes.fusion")
    hints = torch.cat([make_image(SIZE * 8, seed=1), make_image(SIZE * 8, seed=2)])
    cond = pkg("inversion.comfy_model").encode_text(tiny.clip, TGT)
    with torch.inference_mode():
        applied = nodes.ControlNetApply().apply_controlnet(cond, adapter_net, hints, 0.7)[0]
    control = applied[0][1]["control"]
    for i in range(2):
        single = node_module._control_for_image(control, i, 2)
        assert torch.equal(single.cond_hint_original, hints[i:i + 1].movedim(-1, 1)) and single.strength == 0.7
    with pytest.raises(ValueError, match="hint image batch is 2 for 3 image"):
        node_module._control_for_image(control, 0, 3)


def test_runner_swaps_adapter_loaders_only_for_the_tiny_model():
    import run_workflow

    prompt = {"1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "t2iadapter_canny_sd14v1.pth"}}}
    with pytest.raises(run_workflow.RunnerError, match=r"node 1 \(ControlNetLoader\) needs 't2iadapter_canny"):
        run_workflow.resolve_adapters(copy.deepcopy(prompt), tiny=False)
    assert run_workflow.resolve_adapters(prompt, tiny=True) == ["1"]
    assert prompt["1"]["class_type"] == run_workflow.TINY_ADAPTER_LOADER


# ------------------------------------------------------------------------------------------------ any step count
def test_start_step_is_given_on_the_papers_50_steps_and_scales_up():
    scaled = fusion.scaled_start_step
    assert [scaled(0, n) for n in (1, 10, 20, 50)] == [0, 0, 0, 0]  # the paper: fusion from the first step
    assert [scaled(4, n) for n in (10, 20, 50, 100)] == [1, 2, 4, 8]  # MasaCtrl's 4 of 50
    assert [scaled(5, 10), scaled(6, 10), scaled(1, 10), scaled(49, 10), scaled(50, 50)] == [1, 2, 1, 10, 50]
    assert fusion.PAPER_STEPS == 50


class FusedSteps(run_mod.Controller):
    """Test controller after the fusion (Alg. 5 rows): per step, whether the target row's self-attention output is
    Attention(Q^T, K^S, V^S) (fused) or the row's own attention (not fused)."""

    EDITS_OUTPUT = True

    def __init__(self):
        self.to_sub, self.to_own = {}, {}

    def active(self, call):
        return call.kind == "self" and call.run is not None

    def edit_output(self, call, out):
        lay = call.layout
        for chunk in range(len(lay.labels)):
            s, t = lay.row(chunk, 0), lay.row(chunk, 2)
            sub, _ = attention(call.q[[t]], call.k[[s]], call.v[[s]], call.heads)
            own, _ = attention(call.q[[t]], call.k[[t]], call.v[[t]], call.heads)
            for store, ref in ((self.to_sub, sub), (self.to_own, own)):
                gap = float((out[t].double() - ref[0]).abs().max())
                store[call.step] = max(store.get(call.step, 0.0), gap)
        return out


@pytest.mark.parametrize("steps, first", [(10, 1), (20, 2), (50, 4)])
def test_chain_fuses_from_the_scaled_start_step(tiny, steps, first):
    """Invert -> MaSaFusion at 10, 20 and 50 steps with start_step 4 (MasaCtrl's, on 50 steps): the target row's
    self-attention is its own before step `first` and the source-keyed one from `first` to the last step."""
    comfy_model = pkg("inversion.comfy_model")
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                    steps=steps, cfg=7.5, latent=make_latent(size=8, seed=4))[0]
    recorder = FusedSteps()
    ctrl = pkg("nodes.fusion").fusion_controller(fusion.ALG5_SOURCES, 4, "all", inv.steps)
    assert ctrl.start_step == first
    model = hooks.add_controller(hooks.add_controller(tiny.model, ctrl), recorder)
    area = torch.zeros(1, 1, 8, 8)
    area[..., 2:6, 1:5] = 1.0
    with torch.inference_mode():
        inv_fusion.fuse_image(model, inv, 0, comfy_model.encode_text(tiny.clip, TGT), area, None)
    assert sorted(recorder.to_sub) == list(range(steps))
    fused = [i for i in range(steps) if recorder.to_sub[i] < 1e-4 < recorder.to_own[i]]
    own = [i for i in range(steps) if recorder.to_own[i] < 1e-4 < recorder.to_sub[i]]
    assert fused == list(range(first, steps)) and own == list(range(first))


def test_node_scales_start_step_to_the_inversions_steps(tiny):
    """The node's start_step 4 at 10 steps is the controller's step 1 (not 4, and not 0)."""
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                    steps=10, cfg=7.5, latent=make_latent(size=8, seed=4))[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    node_out = call_node("AttnEditFusionWithAdapter", model=tiny.model, clip=tiny.clip, inversion=inv,
                         target_prompt=TGT, mask=mask, seed=0, start_step=4, layers="all")[0]["samples"]
    comfy_model = pkg("inversion.comfy_model")
    area = (mask[:, ::8, ::8] > 0.5).float()[None]

    def engine(start):
        model = hooks.add_controller(tiny.model, fusion.MaskedSelfAttentionFusion(fusion.ALG5_SOURCES, start))
        with torch.inference_mode():
            final, layout, _ = inv_fusion.fuse_image(model, inv, 0, comfy_model.encode_text(tiny.clip, TGT), area,
                                                     None)
        return comfy_model.latent_to_raw(tiny.model, final)[layout.target_stream]

    assert torch.equal(node_out[0], engine(1))
    assert not torch.allclose(node_out[0], engine(4), atol=1e-5)
    assert not torch.allclose(node_out[0], engine(0), atol=1e-5)


def test_non_square_latent(tiny, adapter_net):
    """A 12x20 latent (96x160 px, attention grids 6x10, 3x5, 2x3): the region, the adapter hint and every stream
    keep the shape, and an empty region with the adapter off the target returns the source."""
    import nodes

    latent = {"samples": torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(5))}
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct", steps=4,
                    cfg=7.5, latent=latent)[0]
    cond = pkg("inversion.comfy_model").encode_text(tiny.clip, TGT)
    hint = make_image(160, seed=1)[:, 32:128]
    with torch.inference_mode():
        applied = nodes.ControlNetApply().apply_controlnet(cond, adapter_net, hint, 1.0)[0]
    mask = torch.zeros(1, 96, 160)
    mask[:, 24:72, 40:120] = 1.0
    target, intermediate, source = run_node(tiny, inv, applied, mask=mask)
    assert target.shape == intermediate.shape == source.shape == (1, 4, 12, 20)
    assert torch.isfinite(target).all() and not torch.allclose(target, source, atol=1e-3)
    empty_t, _, empty_s = run_node(tiny, inv, applied, mask=torch.zeros(1, 96, 160), adapter_on_target=False)
    assert torch.allclose(empty_t, empty_s, atol=5e-2, rtol=0)
