"""The one module of `inversion/` that touches ComfyUI: running our algorithms inside ComfyUI's sampling machinery.

Every algorithm of the pack (inversion, null-text, the edit loop, MAG-Edit, DPL, InstDiffEdit) runs as the body of a
custom KSAMPLER passed to `comfy.sample.sample_custom`, so ComfyUI does what it does for every sampler on both
hosts: loads the model with its memory management, converts latents in and out of model space, prepares conditioning
(SDXL size conditioning, ControlNet / T2I-Adapter, inpainting concat) and applies every other patch on the MODEL.
Inside, `ComfyDenoiser` calls ComfyUI's CFG denoiser; our unet wrapper (attention/hooks.py) reads per-call knobs from
the RunState.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..attention import hooks
from ..attention.run import RunState

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")  # UNet families: every technique
# rectified-flow DiT families: inversion, edit sampler, P2P, attention maps (docs/flux.md; SD3 / SD3.5: its section)
FLOW_FAMILIES = ("flux", "sd3")
INVERTIBLE_FAMILIES = SUPPORTED_FAMILIES + FLOW_FAMILIES
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3 / SD3.5"}
# The sampler maths a family needs, from ComfyUI's model_sampling class (comfy/model_sampling.py): EPS (eps
# prediction), V_PREDICTION (v prediction) -- both run DDIM on the implied eps -- or CONST (rectified flow: the model
# predicts the velocity v, x_sigma = (1 - sigma) x0 + sigma noise, denoised = x - sigma v).
SAMPLER_MATHS = ("eps", "v", "flow")
FLUX_DEFAULT_GUIDANCE = 3.5  # Flux-dev's guidance embedding default (ComfyUI FluxGuidance / model_base.Flux)


class UnsupportedModelError(ValueError):
    """A MODEL whose family a technique does not support."""


class InputSizeError(ValueError):
    """An image or latent smaller than the UNet can denoise (fewer than one latent cell at its deepest level)."""


class TextEncoderMismatchError(ValueError):
    """Conditioning whose embedding width is not the MODEL's cross-attention context width (a CLIP of another
    family)."""


# embedding widths of the supported families' text encoders, to name the family a wrong CLIP belongs to
CONTEXT_WIDTH_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 4096: "Flux / SD3 T5-XXL"}


# ------------------------------------------------------------------------------------------------ host services
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def intermediate_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.intermediate_device()


class Progress:
    """ComfyUI progress bar (+ latent preview when the host enables previews) over `total` units of work."""

    def __init__(self, model, total: int):
        import comfy.utils
        import latent_preview

        self.total = max(int(total), 1)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        try:
            self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        except Exception:  # previews are a nicety; never fail a run on them
            self.previewer = None

    def update(self, units: int = 1, x0: torch.Tensor | None = None) -> None:
        check_interrupt()
        self.done = min(self.done + units, self.total)
        preview = None
        if self.previewer is not None and x0 is not None:
            try:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[-1:].detach().float())
            except Exception:
                preview = None
        self.bar.update_absolute(self.done, self.total, preview)


# ------------------------------------------------------------------------------------------------ model facts
def model_family(model) -> str:
    """"sd1", "sd2", "sdxl", "flux" (ComfyUI 0.3.x: Flux-dev, Schnell, Fill and their subclasses), "sd3" (ComfyUI 0.3.x
    SD3 config: SD3 medium, SD3.5 medium / large / large turbo) or the host's config class name for other models."""
    import comfy.supported_models as sm

    config = getattr(model.model, "model_config", None)
    for family, classes in (("sdxl", ("SDXL", "SDXLRefiner")), ("sd2", ("SD20",)), ("sd1", ("SD15",)),
                            ("flux", ("Flux",)), ("sd3", ("SD3",))):
        for name in classes:
            cls = getattr(sm, name, None)
            if cls is not None and isinstance(config, cls):
                return family
    return type(config).__name__ if config is not None else type(model.model).__name__


def require_family(model, technique: str, families: tuple[str, ...] = SUPPORTED_FAMILIES) -> str:
    """The model family, or an UnsupportedModelError naming the technique, the model and what is supported.

    UNet families must have attention sites; flow families (Flux) are accepted only where `families` lists them."""
    family = model_family(model)
    unets = [f for f in families if f in SUPPORTED_FAMILIES]
    flows = [f for f in families if f in FLOW_FAMILIES]
    ok = family in flows or (family in unets and hooks.unet_sites(model))
    if not ok:
        also = f" and {', '.join(FAMILY_NAMES[f] for f in flows)} (ComfyUI 0.3.x)" if flows else ""
        load = "an SD1.5, SD2.x or SDXL checkpoint" + (f" or a {FAMILY_NAMES[flows[0]]} model" if flows else "")
        raise UnsupportedModelError(
            f"{technique} supports {', '.join(FAMILY_NAMES.get(f, f) for f in unets)} UNet models{also}; the "
            f"connected MODEL is {FAMILY_NAMES.get(family, family)}. Load {load} for this node"
            + ("." if flows or family not in FLOW_FAMILIES else
               f" (on {FAMILY_NAMES[family]} the pack does inversion, the edit sampler, Prompt-to-Prompt, attention maps and CPAM's "
               "background preservation so far, see docs/flux.md)."))
    return family


def sampler_maths(model) -> str:
    """Which sampler maths the MODEL needs (SAMPLER_MATHS): "flow" for ComfyUI's CONST model sampling (Flux, SD3),
    "v" for v-prediction, "eps" otherwise. Reads the model_sampling object in use (ModelSampling* patches honoured)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else \
        model.model.model_sampling
    const = getattr(ms, "CONST", None)  # the 2024-03 host has no flow sampling
    if const is not None and isinstance(sampling, const):
        return "flow"
    if isinstance(sampling, ms.V_PREDICTION):
        return "v"
    return "eps"


def is_flow(model) -> bool:
    """True for rectified-flow models (CONST sampling: the model predicts a velocity)."""
    return sampler_maths(model) == "flow"


def guidance_embedded(model) -> bool:
    """True when the model takes a guidance value as an input embedding (Flux-dev; not Schnell, not UNets)."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return bool(config.get("guidance_embed", False))


def with_guidance(model, conditioning: list, guidance: float) -> list:
    """`conditioning` with Flux's guidance value set on every entry, as core FluxGuidance does
    (node_helpers.conditioning_set_values(c, {"guidance": g})); unchanged for models without a guidance embedding."""
    if not guidance_embedded(model):
        return conditioning
    return [[entry[0], {**entry[1], "guidance": float(guidance)}] for entry in conditioning]


def semantic_level(model) -> int:
    """Level of the attention maps the pack's masks and heat maps read: the UNets' "16x16" level
    (layers.SEMANTIC_LEVEL) or, on Flux, the joint attention's image-token grid (layers.FLUX_LEVEL: every Flux block
    attends at latent/2, and every block is averaged, as DAAM averages every UNet layer)."""
    from ..attention.layers import FLUX_LEVEL, SEMANTIC_LEVEL

    return FLUX_LEVEL if hooks.is_joint(model) else SEMANTIC_LEVEL


def count_sites(model, kind: str, level: int) -> int:
    """Attention calls of `kind` ("cross" / "self") at `level` in one UNet forward: a capture holding that many live
    maps may end the forward (CaptureSpec.stop_after). Every transformer site has one self and one cross call."""
    if kind not in ("cross", "self"):
        raise ValueError(f"kind must be 'cross' or 'self', not {kind!r}")
    return sum(1 for s in hooks.unet_sites(model) if s.level == level)


def min_latent_side(model) -> int:
    """Smallest latent side (cells) the UNet denoises with one cell at its deepest level: 2 ** (number of
    down-samplings), i.e. 8 cells (64 px) for SD1.x / SD2.x, 4 cells (32 px) for SDXL. Below it the down-sampling
    convolutions round 1 cell up and the skip connections no longer match the picture (or GroupNorm fails)."""
    unet = getattr(model.model, "diffusion_model", None)
    mult = getattr(unet, "channel_mult", None)
    if mult is not None:
        return 2 ** (len(mult) - 1)
    blocks = getattr(unet, "input_blocks", [])
    return 2 ** sum(1 for block in blocks for m in block if type(m).__name__ == "Downsample")


def vae_scale(vae) -> int:
    """Pixels per latent cell of `vae` (8 for SD VAEs)."""
    ratio = getattr(vae, "downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def check_latent_size(model, height: int, width: int, what: str, scale: int = 8) -> None:
    """InputSizeError naming `what`, its size and the model's minimum when a latent of height x width cells (or an
    image of that many cells times `scale` px) is smaller than the UNet can denoise (min_latent_side)."""
    side = min_latent_side(model)
    if height < side or width < side:
        family = FAMILY_NAMES.get(model_family(model), model_family(model))
        raise InputSizeError(
            f"{what} is {width * scale}x{height * scale} px ({width}x{height} latent cells); this {family} MODEL "
            f"needs at least {side * scale}x{side * scale} px ({side}x{side} cells, one per UNet level). Use a larger "
            "image (e.g. upscale it first).")


def context_width(model) -> int | None:
    """Width E of the cross-attention context the UNet takes (768 SD1.x, 1024 SD2.x, 2048 SDXL); None if unknown."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    embedder = (config.get("context_embedder_config") or {}).get("params", {})  # SD3's MMDiT: Linear(4096, hidden)
    width = config.get("context_dim") or config.get("context_in_dim") or embedder.get("in_features")
    if width:
        return int(width)
    crosses = [m for m in model.model.modules() if type(m).__name__ == "CrossAttention" and hasattr(m, "to_k")
               and m.to_k.in_features != getattr(m.to_q, "in_features", None)]
    return int(crosses[0].to_k.in_features) if crosses else None


def check_text_width(model, conditioning, what: str) -> None:
    """TextEncoderMismatchError when the CONDITIONING `conditioning` (or a bare [B, T, E] context) was encoded by a
    text encoder whose width E is not the MODEL's context width: a CLIP of another family (SDXL CLIP into an SD1.5
    UNet), which would otherwise fail inside the model with "mat1 and mat2 shapes cannot be multiplied"."""
    expected = context_width(model)
    if expected is None or conditioning is None:
        return
    tensors = [conditioning] if isinstance(conditioning, torch.Tensor) else \
        [entry[0] for entry in conditioning if isinstance(entry, (list, tuple)) and entry
         and isinstance(entry[0], torch.Tensor)]
    for tensor in tensors:
        got = int(tensor.shape[-1])
        if got != expected:
            family = model_family(model)
            other = CONTEXT_WIDTH_FAMILIES.get(got, "another model's")
            raise TextEncoderMismatchError(
                f"{what} comes from a text encoder of width {got} ({other} CLIP) but this {FAMILY_NAMES.get(family, family)} "
                f"MODEL takes text embeddings of width {expected}; connect the CLIP of the same checkpoint as the "
                "MODEL (e.g. the CLIP output of the Load Checkpoint node that gives this MODEL).")


def weight_patches_digest(model) -> str:
    """A short digest of the weight patches on the ModelPatcher (LoRA and other `add_patches` patches: keys, strengths
    and the identity of the patch tensors); "" when there are none. Object patches and model_options (attention
    patches such as the pack's own hooks, sampling overrides) are not weight changes and are not included."""
    patches = getattr(model, "patches", None) or {}
    if not patches:
        return ""
    digest = hashlib.sha1()
    for key in sorted(patches):
        digest.update(repr((key, [_patch_token(p) for p in patches[key]])).encode())
    return f"{len(patches)} patched weights #{digest.hexdigest()[:12]}"


def _patch_token(obj, depth: int = 0):
    """A hashable description of one patch entry: numbers and strings as they are, tensors by shape and storage."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype), obj.data_ptr())
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 4:
        return (type(obj).__name__, id(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(_patch_token(o, depth + 1) for o in obj)
    if hasattr(obj, "weights"):  # LoRAAdapter and other weight adapters of newer hosts
        return (type(obj).__name__, _patch_token(obj.weights, depth + 1))
    return (type(obj).__name__, id(obj))


def model_fingerprint(model) -> tuple:
    """Identity of the diffusion model: (class, family, model type, id of the base model, weight-patch digest).
    Inversions are only valid for the model they were made on; the last entry tells a LoRA'd copy from the plain one."""
    base = model.model
    return (type(base).__name__, model_family(model), str(getattr(base, "model_type", "")), id(base),
            weight_patches_digest(model))


def sigma_table(model) -> torch.Tensor:
    """The model's discrete sigma table (model_sampling.sigmas), honouring ModelSampling* object patches."""
    if hasattr(model, "get_model_object"):
        sampling = model.get_model_object("model_sampling")
    else:
        sampling = model.object_patches.get("model_sampling", model.model.model_sampling)
    return sampling.sigmas.detach().float().cpu()


def encode_text(clip, text: str) -> list:
    """CONDITIONING for `text`, as core CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def vae_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> raw LATENT samples (VAEEncode)."""
    return vae.encode(image[:, :, :, :3])


def vae_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Raw LATENT samples -> IMAGE [B, H, W, 3] (VAEDecode)."""
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:]) if images.ndim > 4 else images


def latent_to_raw(model, x: torch.Tensor) -> torch.Tensor:
    """Model-space latent -> LATENT["samples"] space (process_latent_out)."""
    return model.model.process_latent_out(x)


# ------------------------------------------------------------------------------------------------ gradients
def _in_place_residuals() -> bool:
    """True on hosts whose BasicTransformerBlock adds residuals in place (the 2024-03 CI host's `_forward`)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    return hasattr(BasicTransformerBlock, "_forward")


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers (created under the executor's inference_mode) by equal normal tensors.

    Values are unchanged, so every later use of the model gives bit-identical results; without it autograd refuses to
    save the weights for backward. Idempotent. Must run outside inference mode.
    """
    replaced = 0
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None and param.is_inference():
                mod._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                replaced += 1
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_inference():
                mod._buffers[name] = buf.clone()
                replaced += 1
    return replaced


def _save_copy(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


@contextmanager
def gradients(base_model: torch.nn.Module):
    """Enable autograd through the UNet inside ComfyUI's executor (which runs everything under inference_mode).

    On hosts with in-place residual adds, activations saved for backward are copied when saved, so the later in-place
    add cannot invalidate them (instead of patching the host's transformer block).
    """
    with torch.inference_mode(False), torch.enable_grad():
        make_autograd_safe(base_model)
        hook = torch.autograd.graph.saved_tensors_hooks(_save_copy, lambda t: t) if _in_place_residuals() \
            else nullcontext()
        with hook:
            yield


# ------------------------------------------------------------------------------------------------ sampling
class ComfyDenoiser:
    """CFG-combined x0 prediction through ComfyUI (KSamplerX0Inpaint -> CFG -> our unet wrapper -> UNet).

    Call knobs (attention/hooks.py wrapper): `context` {label: context} replaces the cross-attention context of those
    chunks; `labels` computes only those chunks, the others return `fill[label]` (zeros by default). After a call
    `outputs(label)` is that chunk's raw (un-combined) prediction.
    """

    def __init__(self, model_k, extra_args: dict, run: RunState):
        self.model_k = model_k
        self.extra_args = extra_args
        self.run = run

    @property
    def base_model(self):
        return self.model_k.inner_model.inner_model

    def __call__(self, x: torch.Tensor, sigma: float, *, context: dict | None = None,
                 labels: frozenset | None = None, fill: dict | None = None, velocity: bool = False) -> torch.Tensor:
        """CFG-combined x0 prediction; with `velocity` (flow models only) the CFG-combined raw velocity v instead,
        exact at every sigma including 0, where x0 = x - sigma * v does not determine v (every chunk is computed)."""
        if velocity and labels is not None:
            raise ValueError("a velocity read computes every CFG chunk; `labels` cannot be combined with it")
        run = self.run
        run.context_override = dict(context or {})
        run.compute_labels = labels
        run.fill = dict(fill or {})
        run.velocity = velocity
        # the value the host's sigma tensor holds (x.dtype), known here without reading the device tensor back
        run.sigma = float(torch.tensor(float(sigma), dtype=x.dtype))
        try:
            sigma_in = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
            return self.model_k(x, sigma_in, **self.extra_args)
        finally:
            run.context_override, run.compute_labels, run.fill, run.sigma = {}, None, {}, None
            run.velocity = False

    def outputs(self, label: int) -> torch.Tensor | None:
        return self.run.outputs.get(label)


def run_sampler(model, positive: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor, cfg: float,
                algorithm: Callable[[ComfyDenoiser, torch.Tensor], Any], run: RunState, *, grad: bool = False,
                seed: int = 0) -> Any:
    """Run `algorithm(denoiser, x)` as the body of a KSAMPLER inside comfy.sample.sample_custom; return its result.

    latent: raw LATENT samples [B, C, h, w]; the algorithm receives them in model space. The run gets a private clone
    of `model` with our unet wrapper and attention dispatchers; `run` is cleared in `finally`, also on errors and
    interrupts, so nothing of this call survives it.
    """
    import comfy.sample
    import comfy.samplers

    check_latent_size(model, int(latent.shape[-2]), int(latent.shape[-1]), "the latent")
    check_text_width(model, positive, "the prompt's conditioning")
    check_text_width(model, negative, "the negative conditioning")
    clone = model.clone()
    hooks.install_unet_wrapper(clone)
    hooks.install_dispatch(clone)
    hooks.attach_run(clone, run)
    box: dict[str, Any] = {}
    # CONST noise scaling hands the sampler sigma_0 * noise + (1 - sigma_0) * latent (0 at sigma_0 = 1): flow
    # algorithms get the model-space latent itself (process_latent_in, as the host applies to latent_image)
    start = model.model.process_latent_in(latent.float()) if is_flow(model) else None

    def attnedit_sampler(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None, **kwargs):
        if start is not None:
            x = start.to(x)
        denoiser = ComfyDenoiser(model_k, extra_args or {}, run)
        with gradients(denoiser.base_model) if grad else nullcontext():
            box["result"] = algorithm(denoiser, x)
        return x

    try:
        comfy.sample.sample_custom(clone, torch.zeros_like(latent), cfg, comfy.samplers.KSAMPLER(attnedit_sampler),
                                   sigmas, positive, negative, latent, disable_pbar=True, seed=seed)
    finally:
        run.clear()
    return box["result"]


# ------------------------------------------------------------------------------------------------ demo model
DEMO_LATENT_SCALE = 0.18215  # the SD1 latent format the demo VAE was folded to (tools/demo/train.py)


def load_demo_model(path: str):
    """(MODEL, CLIP, VAE) of the demo model file written by tools/demo/export.py, built from ComfyUI's own classes.

    The UNet is ComfyUI's SD1-layout UNetModel inside a BaseModel whose config is a private subclass of
    comfy.supported_models.SD15 (SD1 latent format 0.18215, discrete eps schedule); the text encoder is ComfyUI's SD1
    CLIP (SD1 tokenizer) with the file's tiny CLIPTextModel config; the VAE is ComfyUI's AutoencoderKL. Nothing is
    registered with ComfyUI. Token-embedding rows outside the demo vocabulary are zero.
    """
    import json
    import os
    import tempfile

    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "attnedit-demo-1":
        raise ValueError(f"demo weights {path!r} are not an Attention Edit demo file (format "
                         f"{meta.get('format')!r}); re-export them with tools/demo/export.py")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    unet_cfg = json.loads(meta["unet_config"])
    clip_config = json.loads(meta["clip_config"])
    ddconfig = json.loads(meta["vae_ddconfig"])

    class DemoSD15(comfy.supported_models.SD15):
        """SD1.x family (subclass: family checks see SD1.x) at the demo model's widths."""

        unet_config = {"context_dim": unet_cfg["context_dim"], "model_channels": unet_cfg["model_channels"]}
        unet_extra_config = {"num_heads": unet_cfg["num_heads"], "num_head_channels": -1}

    cfg = DemoSD15(dict(unet_cfg))
    cfg.unet_config["dtype"] = torch.float32
    base = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=mm.unet_offload_device())
    unet_sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    base.diffusion_model.load_state_dict(unet_sd, strict=True)
    base.to(torch.float32)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())

    with tempfile.TemporaryDirectory(prefix="attnedit_demo_") as tmp:  # the 2024 host reads the config from a file
        config_path = os.path.join(tmp, "clip_config.json")
        with open(config_path, "w") as fh:
            json.dump(clip_config, fh)
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": config_path}
        with torch.no_grad():
            clip = comfy.sd.CLIP(target)
    ids, rows = sd.pop("clip.sparse_token_ids"), sd.pop("clip.sparse_token_rows")
    embedding = torch.zeros(clip_config["vocab_size"], clip_config["hidden_size"])
    embedding[ids] = rows
    clip_sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
    clip_sd["text_model.embeddings.token_embedding.weight"] = embedding
    encoder = clip.cond_stage_model
    encoder = getattr(encoder, encoder.clip)
    with torch.no_grad():
        missing, unexpected = encoder.transformer.load_state_dict(clip_sd, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(f"demo weights {path!r} do not fit the text encoder (missing {missing}, unexpected "
                         f"{unexpected}); re-export them with tools/demo/export.py")

    vae_sd = {k[len("vae."):]: v for k, v in sd.items() if k.startswith("vae.")}
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    return model, clip, vae
