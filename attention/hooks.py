"""The one module of `attention/` that touches ComfyUI: attention dispatchers, the UNet wrapper, site discovery.

Everything is installed on a `ModelPatcher.clone()` through the public patch registries (attn1/attn2 replace, the
unet function wrapper); nothing is assigned into `comfy.*` or `torch.*`. Patch functions are module-level functions
(deep-copy keeps their identity); what they need per call comes from `extra_options`: the controllers installed by
patch nodes (keys.CONTROLLERS) and the RunState of the sampling node (keys.RUN).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import keys
from .core import merge_heads, split_heads
from .joint import JointLayout, joint_dispatch
from .layers import FLUX_DOUBLE, FLUX_LEVEL, FLUX_SINGLE, AttnSite, flux_grid, query_grid
from .run import AttnCall, BatchLayout, Controller, RunState, dispatch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- sites
def unet_sites(model_patcher) -> list[AttnSite]:
    """Every transformer attention site of the patcher's UNet, with its level (see layers.py).

    Walks ComfyUI's `UNetModel` blocks in order: input blocks halve the resolution after each Downsample, output blocks
    double it after each Upsample; each SpatialTransformer contributes `len(transformer_blocks)` sites (SDXL: 2 or 10).
    """
    unet = getattr(model_patcher.model, "diffusion_model", None)
    if unet is None or not hasattr(unet, "input_blocks"):
        return []
    sites: list[AttnSite] = []
    level = 1
    for index, block in enumerate(unet.input_blocks):
        sites += _block_sites("input", index, block, level)
        if any(type(m).__name__ == "Downsample" for m in block):
            level *= 2
    sites += _block_sites("middle", 0, unet.middle_block, level)
    for index, block in enumerate(unet.output_blocks):
        sites += _block_sites("output", index, block, level)
        if any(type(m).__name__ == "Upsample" for m in block):
            level //= 2
    return sites


def flux_sites(model_patcher) -> list[AttnSite]:
    """Every joint-attention site of a Flux diffusion model (comfy/ldm/flux/model.py): ("double", i) for each
    double-stream block, then ("single", j) for each single-stream block, all at FLUX_LEVEL (see layers.py)."""
    dit = getattr(model_patcher.model, "diffusion_model", None)
    if dit is None or not hasattr(dit, "double_blocks") or not hasattr(dit, "single_blocks"):
        return []
    return ([AttnSite(FLUX_DOUBLE, i, 0, FLUX_LEVEL) for i in range(len(dit.double_blocks))]
            + [AttnSite(FLUX_SINGLE, j, 0, FLUX_LEVEL) for j in range(len(dit.single_blocks))])


def mmdit_sites(model_patcher) -> list[AttnSite]:
    """Every joint-attention site of an SD3 / SD3.5 MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py): one per joint
    block, keyed as the host's `patches_replace["dit"][("double_block", i)]` (block "double", index i), at FLUX_LEVEL
    (patch size 2, as Flux)."""
    dit = getattr(model_patcher.model, "diffusion_model", None)
    if dit is None or not hasattr(dit, "joint_blocks"):
        return []
    return [AttnSite(FLUX_DOUBLE, i, 0, FLUX_LEVEL) for i in range(len(dit.joint_blocks))]


def joint_sites(model_patcher) -> list[AttnSite]:
    """The joint-attention sites of a Flux or SD3 diffusion model ([] for UNets)."""
    return flux_sites(model_patcher) or mmdit_sites(model_patcher)


def _block_sites(name: str, index: int, block, level: int) -> list[AttnSite]:
    out = []
    for module in block:
        if type(module).__name__ == "SpatialTransformer":
            out += [AttnSite(name, index, depth, level) for depth in range(len(module.transformer_blocks))]
    return out


# --------------------------------------------------------------------------------------------------- dispatch
def default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict):
    """The host's own attention kernel, called exactly as CrossAttention.forward would call it."""
    from comfy.ldm.modules import attention as comfy_attention

    if "attn_precision" in extra_options:  # ComfyUI >= 2024-05 signature
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options["attn_precision"])
    return comfy_attention.optimized_attention(q, k, v, heads)


def _make_call(q, k, v, extra_options: dict, kind: str) -> AttnCall:
    shape = extra_options.get("original_shape")
    latent_hw = (int(shape[2]), int(shape[3])) if shape is not None else (1, q.shape[1])
    h, w, level = query_grid(q.shape[1], latent_hw)
    block = extra_options.get("block") or ("unknown", 0)
    site = AttnSite(block[0], int(block[1]), int(extra_options.get("block_index", 0)), level)
    layout = BatchLayout.from_call(q.shape[0], extra_options.get("cond_or_uncond", [0]))
    run = extra_options.get(keys.RUN)
    if run is not None and run.sigma is not None:  # our denoiser's value: no GPU sync per attention call
        sigma = run.sigma
    else:
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas[0]) if sigmas is not None else 0.0
    return AttnCall(q, k, v, int(extra_options["n_heads"]), kind, site, (h, w), layout, run, sigma)


def _split_extra(k, v, extra_options):
    """Separate the tokens appended by context patchers (attn2_context_patch) from the prompt's own tokens."""
    appended = extra_options.get(keys.CONTEXT_EXTRA)
    if not appended:
        return k, v, {}
    total = sum(n for _, n in appended)
    extra, start = {}, k.shape[1] - total
    for name, n in appended:
        extra[name] = (k[:, start:start + n], v[:, start:start + n])
        start += n
    return k[:, :k.shape[1] - total], v[:, :v.shape[1] - total], extra


def _dispatch(q, k, v, extra_options, kind):
    controllers = extra_options.get(keys.CONTROLLERS, ())
    run = extra_options.get(keys.RUN)
    extra = {}
    if kind == "cross":
        k, v, extra = _split_extra(k, v, extra_options)
    if not controllers and (run is None or run.capture is None):  # nothing to edit or record: the host's kernel
        return default_attention(q, k, v, extra_options["n_heads"], extra_options)
    call = _make_call(q, k, v, extra_options, kind)
    call.extra = extra
    return dispatch(call, controllers, lambda: default_attention(q, k, v, call.heads, extra_options))


def attn1_dispatch(q, k, v, extra_options):
    """attn1 (self-attention) replace patch shared by every controller of this pack."""
    return _dispatch(q, k, v, extra_options, "self")


def attn2_dispatch(q, k, v, extra_options):
    """attn2 (cross-attention) replace patch shared by every controller of this pack."""
    return _dispatch(q, k, v, extra_options, "cross")


setattr(attn1_dispatch, keys.DISPATCH_MARK, True)
setattr(attn2_dispatch, keys.DISPATCH_MARK, True)


def install_dispatch(model_patcher, sites: list[AttnSite] | None = None) -> None:
    """Route the given sites (default: all) of `model_patcher` (a clone) through our dispatchers (Flux: joint
    attention, see install_joint_dispatch).

    A site that already carries another pack's replace patch is left alone (logged): we never drop a foreign patch.
    """
    if sites is None and joint_sites(model_patcher):
        install_joint_dispatch(model_patcher)
        return
    sites = unet_sites(model_patcher) if sites is None else sites
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    for site in sites:
        for name, fn, setter in (("attn1", attn1_dispatch, model_patcher.set_model_attn1_replace),
                                 ("attn2", attn2_dispatch, model_patcher.set_model_attn2_replace)):
            # ComfyUI looks up (block, index, depth) first, then (block, index): a foreign patch on either must win
            existing = replace.get(name, {})
            current = existing.get(site.key) or existing.get(site.key[:2])
            if current is not None and not getattr(current, keys.DISPATCH_MARK, False):
                log.warning("Attention Edit: %s %s already patched by another node; leaving it alone", name, site.key)
                continue
            setter(fn, site.block, site.index, site.depth)
    if sites:  # where attn2_context_patch may extend the context: only sites whose dispatcher strips it again
        options = model_patcher.model_options["transformer_options"]
        attn2 = options.get("patches_replace", {}).get("attn2", {})
        options[keys.DISPATCHED_SITES] = frozenset(key for key, fn in attn2.items()
                                                   if getattr(fn, keys.DISPATCH_MARK, False))


# --------------------------------------------------------------------------------------------------- Flux joint attention
@dataclass(frozen=True)
class FluxBlockSite:
    """`patches_replace["dit"]` entry of one Flux block: runs the host's block unchanged with the block's site added to
    a copy of its transformer_options, so the attention override knows which block calls it (Flux's blocks do not say).
    Deep copies keep it (ModelPatcher.clone deep-copies model_options)."""

    block: str
    index: int

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        if options.get(keys.RUN) is None:  # outside our samplers nothing acts: the block as the host runs it
            return extra["original_block"](args)
        options = dict(options)
        options[keys.SITE] = (self.block, self.index)
        return extra["original_block"](dict(args, transformer_options=options))


setattr(FluxBlockSite, keys.DISPATCH_MARK, True)


def joint_attention_override(func, *args, **kwargs):
    """`transformer_options["optimized_attention_override"]` (ComfyUI 0.3.x wrap_attn) of a Flux or SD3 clone: the
    joint attention of a block inside our samplers goes through attention.joint.joint_dispatch; every other call (no
    run, no site, a mask, another layout, SD3.5's image-only second attention) runs `func`, the host's kernel, unchanged.

    Flux hands q, k, v as [B, H, L, D] with skip_reshape and `heads` positional (comfy/ldm/flux/math.py); SD3's MMDiT
    as [B, L, H*D] with `heads=` by keyword (mmdit.py _block_mixing): the latter are split into heads for the pack and
    merged again for the host's kernel."""
    options = kwargs.get("transformer_options") or {}
    run = options.get(keys.RUN)
    site = options.get(keys.SITE)
    layout: JointLayout | None = options.get(keys.JOINT_LAYOUT)
    heads = args[3] if len(args) >= 4 else kwargs.get("heads")
    if run is None or site is None or layout is None or len(args) < 3 or heads is None \
            or kwargs.get("mask") is not None or kwargs.get("skip_output_reshape"):
        return func(*args, **kwargs)
    q, k, v = args[:3]
    merged = not kwargs.get("skip_reshape")  # SD3: [B, L, H*D]
    if q.ndim != (3 if merged else 4) or not layout.fits(q.shape[1 if merged else 2]):
        log.debug("Attention Edit: joint attention of %s tokens does not match %s; host kernel", q.shape, layout)
        return func(*args, **kwargs)
    if merged:  # MMDiT's v arrives as [B, L, H, D] (split_qkv), q and k as [B, L, H*D]
        q, k, v = (split_heads(t.reshape(t.shape[0], t.shape[1], -1), int(heads)) for t in (q, k, v))
    head_args = tuple(args[3:])

    def host(q_, k_, v_):
        if merged:
            q_, k_, v_ = merge_heads(q_), merge_heads(k_), merge_heads(v_)
        return func(q_, k_, v_, *head_args, **kwargs)

    batch = BatchLayout.from_call(q.shape[0], options.get("cond_or_uncond", [0]))
    sigma = run.sigma if run.sigma is not None else float(options["sigmas"][0]) if "sigmas" in options else 0.0
    attn_site = AttnSite(site[0], int(site[1]), 0, FLUX_LEVEL)
    return joint_dispatch(q, k, v, layout, attn_site, batch, run, sigma, options.get(keys.CONTROLLERS, ()), host, host)


def install_joint_dispatch(model_patcher) -> None:
    """Route a Flux clone's joint attention through the pack: a `patches_replace["dit"]` entry per block (its site)
    and the `optimized_attention_override` (ComfyUI 0.3.x public transformer_options key). A block or override that
    another node installed is left alone (logged)."""
    options = model_patcher.model_options.setdefault("transformer_options", {})
    dit = options.get("patches_replace", {}).get("dit", {})
    for site in joint_sites(model_patcher):
        name = f"{site.block}_block"
        current = dit.get((name, site.index))
        if current is not None and not getattr(current, keys.DISPATCH_MARK, False):
            log.warning("Attention Edit: Flux %s %d already patched by another node; leaving it alone", name,
                        site.index)
            continue
        model_patcher.set_model_patch_replace(FluxBlockSite(site.block, site.index), "dit", name, site.index)
    options = model_patcher.model_options["transformer_options"]
    current = options.get("optimized_attention_override")
    if current is not None and current is not joint_attention_override:
        log.warning("Attention Edit: another node set optimized_attention_override; Flux attention is not routed")
        return
    options["optimized_attention_override"] = joint_attention_override
    options[keys.JOINT] = True


def joint_layout(c: dict, latent: torch.Tensor) -> JointLayout:
    """Text tokens (the T5 context's length, c_crossattn) and image grid of one Flux model call."""
    return JointLayout(int(c["c_crossattn"].shape[1]), flux_grid((int(latent.shape[-2]), int(latent.shape[-1]))))


def is_joint(model_patcher) -> bool:
    """True for a model whose attention sites are joint (Flux, SD3)."""
    return bool(joint_sites(model_patcher))


def add_controller(model, controller: Controller):
    """A clone of `model` with `controller` appended to its controllers and every site dispatched (patch nodes)."""
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options[keys.CONTROLLERS] = tuple(options.get(keys.CONTROLLERS, ())) + (controller,)
    install_dispatch(clone)
    return clone


def add_step_hook(model, hook):
    """A clone of `model` whose edit sampler will run `hook` around every step (local blend, MAG-Edit, ...)."""
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options[keys.STEP_HOOKS] = tuple(options.get(keys.STEP_HOOKS, ())) + (hook,)
    return clone


# --------------------------------------------------------------------------------------------------- context patches
def attn2_context_patch(n, context, value, extra_options):
    """attn2_patch (pre-projection) that appends the context patchers' extra tokens to the cross-attention context.

    Each patcher in keys.CONTEXT_PATCHES is asked `extra_context(run)` -> ((name, tensor [1 or R, T', E]), ...); the
    tokens are appended after the prompt's tokens of every row and their counts recorded in this block call's
    `extra_options` (the dict the replace patch receives next), so `_dispatch` splits them off again: controllers
    see the prompt as usual plus `call.extra[name] = (k, v)`. Only at sites routed through our dispatcher and only
    inside our samplers (a RunState is present); everywhere else the context passes unchanged.
    """
    run = extra_options.get(keys.RUN)
    patchers = extra_options.get(keys.CONTEXT_PATCHES, ())
    block = extra_options.get("block") or ("unknown", 0)
    site = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
    if run is None or not patchers or site not in extra_options.get(keys.DISPATCHED_SITES, ()):
        return n, context, value
    pieces, appended = [], []
    for patcher in patchers:
        for name, tokens in patcher.extra_context(run):
            tokens = tokens.to(device=context.device, dtype=context.dtype)
            pieces.append(tokens.expand(context.shape[0], -1, -1) if tokens.shape[0] == 1 else tokens)
            appended.append((name, tokens.shape[1]))
    if not pieces:
        return n, context, value
    extra_options[keys.CONTEXT_EXTRA] = tuple(appended)
    value = context if value is None else value
    return n, torch.cat([context, *pieces], 1), torch.cat([value, *pieces], 1)


def add_context_patch(model, patcher):
    """A clone of `model` whose cross-attention context gets `patcher.extra_context(run)` appended (see
    attn2_context_patch); every site is dispatched. Models without context patchers are unaffected."""
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options[keys.CONTEXT_PATCHES] = tuple(options.get(keys.CONTEXT_PATCHES, ())) + (patcher,)
    if attn2_context_patch not in options.get("patches", {}).get("attn2_patch", []):
        clone.set_model_attn2_patch(attn2_context_patch)
    install_dispatch(clone)
    return clone


def bind_inversion(model, node: str, key: tuple, description: str):
    """A clone of `model` noting that the patch `node` just added was made for the inversion identified by `key`
    (masks and schedules aligned to it); the edit sampler refuses another inversion (see `bound_inversions`)."""
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options[keys.BOUND_INVERSIONS] = tuple(options.get(keys.BOUND_INVERSIONS, ())) + ((node, key, description),)
    return clone


def bound_inversions(model) -> tuple:
    return tuple(model.model_options.get("transformer_options", {}).get(keys.BOUND_INVERSIONS, ()))


def controllers_of(model) -> tuple:
    return tuple(model.model_options.get("transformer_options", {}).get(keys.CONTROLLERS, ()))


def step_hooks_of(model) -> tuple:
    return tuple(model.model_options.get("transformer_options", {}).get(keys.STEP_HOOKS, ()))


# --------------------------------------------------------------------------------------------------- UNet wrapper
def _slice_rows(value, rows: torch.Tensor, total: int):
    """Select `rows` from every tensor (nested in dicts/lists, e.g. ControlNet outputs) whose batch is `total`."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, total) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_slice_rows(v, rows, total) for v in value)
    return value


def _override_context(context: torch.Tensor, labels: list[int], per_chunk: int, overrides: dict) -> torch.Tensor:
    """Replace the cross-attention context of chunks whose label has an override ([1 or B, T', C] tensor)."""
    pieces = []
    for chunk, label in enumerate(labels):
        piece = context[chunk * per_chunk:(chunk + 1) * per_chunk]
        if label in overrides:
            new = overrides[label].to(device=piece.device, dtype=piece.dtype)
            if new.shape[1] != piece.shape[1]:
                if piece.shape[1] % new.shape[1]:
                    raise ValueError(f"context override has {new.shape[1]} tokens; the batch has {piece.shape[1]}")
                new = new.repeat(1, piece.shape[1] // new.shape[1], 1)  # ComfyUI pads by repetition (lcm rule)
            piece = new.expand(per_chunk, -1, -1) if new.shape[0] == 1 else new
        pieces.append(piece)
    return torch.cat(pieces)


def keep_control_rows(control, keep: torch.Tensor):
    """ControlNet / T2I-Adapter outputs (dict of lists of [R, C, h, w] tensors or None) with the rows where `keep`
    ([R] bool) is False set to zero; new containers and tensors, the host's are left untouched (the UNet pops them).

    A zero residual leaves the UNet's hidden state exactly as without the control (h + 0 == h).
    """
    if isinstance(control, torch.Tensor):
        if control.ndim == 0 or control.shape[0] not in (1, keep.shape[0]):
            return control
        mask = keep.to(control.device).view(-1, *([1] * (control.ndim - 1)))
        return torch.where(mask, control, torch.zeros((), dtype=control.dtype, device=control.device))
    if isinstance(control, dict):
        return {k: keep_control_rows(v, keep) for k, v in control.items()}
    if isinstance(control, list | tuple):
        return type(control)(keep_control_rows(v, keep) for v in control)
    return control


def _control_keep(run: RunState, labels: list[int], per_chunk: int) -> torch.Tensor:
    """[R] bool: rows (chunk-major) whose latent row has a role in run.control_roles."""
    rows = [run.roles[b] in run.control_roles if b < len(run.roles) else True for b in range(per_chunk)]
    return torch.tensor(rows * len(labels), dtype=torch.bool)


def _call_inner(prev, apply_model, args):
    if prev is not None:
        return prev(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


class VelocityUnavailableError(RuntimeError):
    """The diffusion model ran without ComfyUI 0.3.x's DIFFUSION_MODEL wrappers, so its raw output was not seen."""


def _velocity_call(prev, apply_model, args):
    """The diffusion model's raw output (a flow model's velocity v) for this call instead of the denoised x0.

    For CONST sampling denoised = x - sigma * v, which loses v at sigma = 0 (the first step of a flow inversion), so the
    output is read where the host produces it: an outermost DIFFUSION_MODEL wrapper (comfy.patcher_extension, ComfyUI
    0.3.x, where every flow family lives) on a copy of this call's transformer_options.
    """
    import comfy.patcher_extension as ext

    box: dict = {}

    def attnedit_velocity(executor, *a, **kw):
        box["v"] = executor(*a, **kw)
        return box["v"]

    c = args["c"]
    options = dict(c.get("transformer_options", {}))
    wrappers = {kind: dict(found) for kind, found in options.get("wrappers", {}).items()}
    kind = ext.WrappersMP.DIFFUSION_MODEL
    wrappers[kind] = {keys.VELOCITY: [attnedit_velocity], **wrappers.get(kind, {})}  # first = outermost
    options["wrappers"] = wrappers
    options[keys.VELOCITY_BOX] = box  # SD3's MMDiT runs no DIFFUSION_MODEL wrappers: its forward tap fills the box
    _call_inner(prev, apply_model, dict(args, c=dict(c, transformer_options=options)))
    if "v" not in box:
        raise VelocityUnavailableError("the diffusion model's output could not be read (no DIFFUSION_MODEL wrapper "
                                       "support): flow-model inversion needs ComfyUI 0.3.x")
    return box["v"].float()  # as BaseModel._apply_model reads it


def make_unet_wrapper(prev=None):
    """ComfyUI unet function wrapper that applies the RunState knobs of the current call and chains `prev`.

    - context_override {label: context}: the cross-attention context of those chunks is replaced (null-text
      embeddings, learned tokens, negative-prompt inversion);
    - compute_labels: only chunks with these labels run through the UNet; the others return `fill[label]` (zeros
      when absent). Used for cond-only passes (MAG-Edit, DPL) and uncond-only passes (null-text inner loop);
    - outputs: the raw per-label denoised outputs of the last call are left in run.outputs;
    - control_roles: ControlNet / T2I-Adapter residuals reach only rows with these roles (the others get zeros).
    """

    def attnedit_unet_wrapper(apply_model, args):
        c = args["c"]
        run: RunState | None = c.get("transformer_options", {}).get(keys.RUN)
        if run is None:
            return _call_inner(prev, apply_model, args)
        labels = [int(x) for x in args["cond_or_uncond"]]
        x = args["input"]
        per_chunk = x.shape[0] // len(labels)
        if run.context_override and c.get("c_crossattn") is not None:
            c = dict(c, c_crossattn=_override_context(c["c_crossattn"], labels, per_chunk, run.context_override))
        if run.control_roles is not None and c.get("control") is not None:
            c = dict(c, control=keep_control_rows(c["control"], _control_keep(run, labels, per_chunk)))
        options = c.get("transformer_options", {})
        if options.get(keys.JOINT) and c.get("c_crossattn") is not None:  # Flux: how this call's tokens are laid out
            c = dict(c, transformer_options={**options, keys.JOINT_LAYOUT: joint_layout(c, x)})
        keep = [i for i, lab in enumerate(labels) if run.compute_labels is None or lab in run.compute_labels]
        if run.velocity:
            out = _velocity_call(prev, apply_model, dict(args, c=c))
        elif len(keep) == len(labels):
            out = _call_inner(prev, apply_model, dict(args, c=c))
        else:
            out = _partial_call(prev, apply_model, args, c, labels, keep, per_chunk, run)
        for chunk, label in enumerate(labels):
            run.outputs[label] = out[chunk * per_chunk:(chunk + 1) * per_chunk]
        return out

    return attnedit_unet_wrapper


def _partial_call(prev, apply_model, args, c, labels, keep, per_chunk, run):
    x = args["input"]
    total = x.shape[0]
    pieces: list[torch.Tensor | None] = [None] * len(labels)
    if keep:
        # made on the latent's device: a CPU index would be copied to the GPU (a stream sync) per UNet call
        rows = torch.cat([torch.arange(i * per_chunk, (i + 1) * per_chunk, device=x.device) for i in keep])
        sub_c = {k: (v if k == "transformer_options" else _slice_rows(v, rows, total)) for k, v in c.items()}
        options = dict(c.get("transformer_options", {}))
        options["cond_or_uncond"] = [labels[i] for i in keep]
        if "uuids" in options:
            options["uuids"] = [options["uuids"][i] for i in keep]
        sub_c["transformer_options"] = options
        sub = dict(args, input=x[rows], timestep=args["timestep"][rows.to(args["timestep"].device)], c=sub_c,
                   cond_or_uncond=options["cond_or_uncond"])
        result = _call_inner(prev, apply_model, sub)
        for j, i in enumerate(keep):
            pieces[i] = result[j * per_chunk:(j + 1) * per_chunk]
    for i, label in enumerate(labels):
        if pieces[i] is None:
            fill = run.fill.get(label)
            pieces[i] = torch.zeros_like(x[:per_chunk]) if fill is None else fill.to(x)
    return torch.cat(pieces)


@dataclass(frozen=True)
class VelocityTap:
    """Object patch of an SD3 clone's `diffusion_model.forward` (ModelPatcher.add_object_patch, as core's
    ModelSamplingSD3 patches model_sampling): runs the forward it wraps unchanged and, on a velocity read
    (_velocity_call put keys.VELOCITY_BOX in this call's transformer_options), keeps its raw output there. MMDiT runs
    no DIFFUSION_MODEL wrappers, and CONST's denoised = x - sigma v loses v at sigma 0."""

    forward: object

    def __deepcopy__(self, memo):
        return self

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        box = (kwargs.get("transformer_options") or {}).get(keys.VELOCITY_BOX)
        if box is not None:
            box["v"] = out
        return out


def install_velocity_tap(model_patcher) -> None:
    """On an SD3 clone (MMDiT), wrap whatever `diffusion_model.forward` it has (a stand-in object patch included)
    in a VelocityTap; other models read the velocity through a DIFFUSION_MODEL wrapper and are left alone."""
    if not mmdit_sites(model_patcher):
        return
    current = model_patcher.get_model_object("diffusion_model.forward")
    if not isinstance(current, VelocityTap):
        model_patcher.add_object_patch("diffusion_model.forward", VelocityTap(current))


def install_unet_wrapper(model_patcher) -> None:
    """Install our wrapper on a clone, chaining whatever unet function wrapper it already had (and, on SD3, the
    velocity tap)."""
    install_velocity_tap(model_patcher)
    prev = model_patcher.model_options.get("model_function_wrapper")
    if prev is not None and getattr(prev, "__name__", "") == "attnedit_unet_wrapper":
        return
    model_patcher.set_model_unet_function_wrapper(make_unet_wrapper(prev))


def attach_run(model_patcher, run: RunState) -> None:
    """Put the RunState of a sampling call on the caller's private clone."""
    model_patcher.model_options.setdefault("transformer_options", {})[keys.RUN] = run
