"""Joint (text + image) attention of diffusion transformers seen as the pack's cross- and self-attention. Pure torch.

Flux (ComfyUI 0.3.x comfy/ldm/flux): every block attends over one sequence of T text tokens (T5, first) followed by N
image tokens (the h/2 x w/2 patch grid, row-major). With P = softmax(Q K^T / sqrt(D)) over all T + N keys
(Vaswani et al. 2017, Eq. 1) and an image query n:
- P[n, :T] (image -> text) is the cross-attention map of the UNet papers (Prompt-to-Prompt, DAAM, local blend),
- P[n, T:] (image -> image) is the self-attention map (MasaCtrl / P2P self-attention injection),
as in Stable Flow (Avrahami et al. 2024, Sec. 3) and KV-Edit (Zhu et al. 2025, Sec. 3.2).

Normalisation (our choice, documented in docs/flux.md): the maps are the joint softmax's own slices, NOT re-normalised
per slice: a cross-map row sums to the image query's total attention mass on the text (< 1); heat maps and local
blend divide by their maximum anyway. After controllers edit a slice, each image-query row is divided by its sum so
it is again a distribution over the joint keys; scaling a key's probability by c and re-normalising equals adding
log c to its logit, so P2P's re-weighting keeps its meaning, and a row the controllers did not touch is unchanged up
to rounding. Text queries (P[:T]) are never edited: they run through the host's kernel. A call whose probabilities
nobody edits (capture only) keeps the host kernel's output bit for bit; its maps are computed on the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import merge_heads
from .layers import AttnSite
from .run import AttnCall, BatchLayout, RunState


@dataclass(frozen=True)
class JointLayout:
    """How one joint attention call lays out its keys: `text` text tokens first, then the image grid (h, w)."""

    text: int
    grid: tuple[int, int]

    @property
    def image(self) -> int:
        return self.grid[0] * self.grid[1]

    def fits(self, length: int) -> bool:
        return length == self.text + self.image


CAPTURE_CHUNK_BYTES = 256 * 2**20  # capture-only calls: float32 logits held at once (queries taken in chunks)


def joint_probs(q: torch.Tensor, k: torch.Tensor, text: int) -> torch.Tensor:
    """softmax(Q_img K^T / sqrt(D)) [R, H, N, T + N] in float32 for the image queries (q, k: [R, H, L, D], text first).

    Each query's softmax is independent of the others, so computing only the image queries' rows is exact."""
    return query_probs(q[:, :, text:], k)


def query_probs(qi: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) [R, H, n, L] in float32 for the queries `qi` [R, H, n, D] over all keys k [R, H, L, D]."""
    logits = qi.float() @ k.float().transpose(-1, -2) * qi.shape[-1] ** -0.5
    return logits.softmax(-1)


def captured_slices(q: torch.Tensor, k: torch.Tensor, text: int, want_self: bool,
                    chunk_bytes: int = CAPTURE_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross [R, H, N, T], self [R, H, N, N] or None) of the joint softmax, the image queries taken in chunks so at
    most about `chunk_bytes` of float32 logits exist at once (a capture-only call never holds [R, H, N, T + N])."""
    rows, heads, length, _ = k.shape
    step = max(1, chunk_bytes // (rows * heads * length * 4))
    crosses, selves = [], []
    for start in range(text, q.shape[2], step):
        probs = query_probs(q[:, :, start:start + step], k)
        crosses.append(probs[..., :text].contiguous())  # copies: a view would keep the chunk's logits alive
        if want_self:
            selves.append(probs[..., text:].contiguous())
    return torch.cat(crosses, 2), torch.cat(selves, 2) if want_self else None


def split_joint(probs: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross [R, H, N, T] = image -> text, self [R, H, N, N] = image -> image) slices of the joint probabilities."""
    return probs[..., :text], probs[..., text:]


def renormalise(probs: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum (a row whose mass the edits removed entirely stays zero)."""
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)


def joint_calls(layout: JointLayout, heads: int, site: AttnSite, batch: BatchLayout, run: RunState | None,
                sigma: float) -> tuple[AttnCall, AttnCall]:
    """The cross (image -> text) and self (image -> image) AttnCalls of one joint call, without tensors yet: `active`
    is asked first, and q / k / v / probabilities are attached (`attach`) only when a controller acts or a map is
    captured."""
    cross_call = AttnCall(None, None, None, heads, "cross", site, layout.grid, batch, run, sigma)
    self_call = AttnCall(None, None, None, heads, "self", site, layout.grid, batch, run, sigma)
    return cross_call, self_call


def attach(call: AttnCall, q, k, v, text: int, probs: torch.Tensor) -> None:
    """Give a slice call its head-merged tensors (q [R, N, H*D] image queries; k, v [R, T or N, H*D] of its slice)
    and its slice of the joint probabilities (what `call.probs()` returns)."""
    keys = slice(None, text) if call.kind == "cross" else slice(text, None)
    call.q, call.k, call.v = merge_heads(q[:, :, text:]), merge_heads(k[:, :, keys]), merge_heads(v[:, :, keys])
    call._probs = probs[..., keys]


def joint_dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: JointLayout, site: AttnSite,
                   batch: BatchLayout, run: RunState | None, sigma: float, controllers, text_attention, host_attention
                   ) -> torch.Tensor:
    """One joint attention call through the pack's controllers: output [R, T + N, H*D] (the host's layout).

    q, k, v [R, H, L, D] (after RoPE, as comfy/ldm/flux/math.py hands them to optimized_attention). First, controllers
    with EDITS_JOINT_KV (KV-Edit-style background preservation) may replace keys / values of the joint sequence
    (`edit_joint_kv(self_call, k, v, text)`, for every query). When no controller edits probabilities,
    `host_attention(q, k, v)` gives the output (bit-identical to the unpatched model when no keys were replaced) and
    captured maps are computed on the side in query chunks (`captured_slices`). Otherwise: the image queries' joint probs are computed, controllers edit the cross slice (calls of kind "cross")
    and the self slice (kind "self") in installation order, the rows are re-normalised when something was edited, the
    slices are recorded (capture), and the image queries' output is P @ V; `text_attention(q_text, k, v)` gives the
    text queries' output. Output editors (EDITS_OUTPUT) are not supported on joint attention (their nodes refuse Flux).
    """
    cross_call, self_call = joint_calls(layout, q.shape[1], site, batch, run, sigma)
    for ctrl in controllers:
        if ctrl.EDITS_JOINT_KV and ctrl.active(self_call):
            k, v = ctrl.edit_joint_kv(self_call, k, v, layout.text)
    editors = {call.kind: [c for c in controllers if (c.EDITS_PROBS or c.EDITS_PROBS_IF_COMPUTED) and c.active(call)]
               for call in (cross_call, self_call)}
    capture = run is not None and run.capture is not None
    wants = {kind: capture and run.capture.wants(kind, site.level) for kind in ("cross", "self")}
    if not any(editors.values()):
        if any(wants.values()):  # capture only: the maps on the side, the output is the host kernel's, bit for bit
            cross, self_ = captured_slices(q, k, layout.text, wants["self"])
            if wants["cross"]:
                run.record(cross_call, cross)
            if wants["self"]:
                run.record(self_call, self_)
        return host_attention(q, k, v)
    probs = joint_probs(q, k, layout.text)
    for call in (cross_call, self_call):
        attach(call, q, k, v, layout.text, probs)
    cross, self_ = split_joint(probs, layout.text)
    for ctrl in editors["cross"]:
        cross = ctrl.edit_probs(cross_call, cross)
    for ctrl in editors["self"]:
        self_ = ctrl.edit_probs(self_call, self_)
    if editors["cross"] or editors["self"]:
        probs = renormalise(torch.cat([cross, self_], -1))
        cross, self_ = split_joint(probs, layout.text)
    if wants["cross"]:
        run.record(cross_call, cross)
    if wants["self"]:
        run.record(self_call, self_)
    image = merge_heads(probs.to(v.dtype) @ v)
    return torch.cat([text_attention(q[:, :, :layout.text], k, v), image], 1)


def copy_keys(k: torch.Tensor, v: torch.Tensor, pairs: list[tuple[int, int]], positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [R, H, L, D] with the tokens at `positions` of each target row replaced by its source row's: KV-Edit's
    background preservation (Zhu et al. 2025, Sec. 3.2: the background tokens' keys and values come from the
    inversion, only the foreground is regenerated). `pairs` (source row, target row); new tensors."""
    k, v = k.clone(), v.clone()
    for s, t in pairs:  # int rows: no index tensor copied to the device per call
        k[t, :, positions] = k[s, :, positions]
        v[t, :, positions] = v[s, :, positions]
    return k, v
