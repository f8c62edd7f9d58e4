"""Per-call and per-run attention state: batch layout, the AttnCall seen by controllers, the RunState of one sampling
call, and attention capture (live maps for losses, running sums for stores and local blend). Pure torch.

How rows are laid out (ComfyUI, both hosts): one UNet call concatenates *chunks*, one per entry of
`extra_options["cond_or_uncond"]` (0 = positive/cond, 1 = negative/uncond; usually `[1, 0]`, `[0]` at cfg 1, and a
single label per call when ComfyUI splits cond and uncond under memory pressure). Each chunk holds the B latent rows
of the sampling call in order; our samplers give every latent row a *role* ("source", "target", ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .core import apply_probs, attention_probs
from .layers import AttnSite

COND, UNCOND = 0, 1
SOURCE, TARGET = "source", "target"


@dataclass(frozen=True)
class BatchLayout:
    """Chunk labels of one UNet call and the number of latent rows per chunk."""

    labels: tuple[int, ...]
    rows_per_chunk: int

    @classmethod
    def from_call(cls, total_rows: int, cond_or_uncond) -> BatchLayout:
        labels = tuple(int(x) for x in cond_or_uncond) or (COND,)
        if total_rows % len(labels):
            raise ValueError(f"{total_rows} rows cannot hold {len(labels)} chunks {labels}")
        return cls(labels, total_rows // len(labels))

    def row(self, chunk: int, branch: int) -> int:
        return chunk * self.rows_per_chunk + branch

    def chunks(self, label: int) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab == label]

    def rows(self, label: int) -> list[int]:
        """All rows of chunks with `label`, chunk-major."""
        return [self.row(c, b) for c in self.chunks(label) for b in range(self.rows_per_chunk)]


@dataclass(frozen=True)
class CaptureSpec:
    """Which attention maps a run records.

    cross_levels / self_levels: site levels to record (see layers.py). labels: chunk labels recorded (P2P and the
    papers use the conditional half only). live: keep this forward's per-head maps (with autograd graph when grad is
    on) for losses. accumulate: keep running head-mean sums over layers and steps (stores, local blend).
    stop_after: with `live`, end the forward by raising CaptureComplete once this many live maps are held, so a pass
    that only needs the maps skips the layers after the last captured one (MAG-Edit's guidance passes).
    """

    cross_levels: frozenset[int] = frozenset({4})
    self_levels: frozenset[int] = frozenset()
    labels: frozenset[int] = frozenset({COND})
    live: bool = False
    accumulate: bool = True
    stop_after: int | None = None

    def wants(self, kind: str, level: int) -> bool:
        return level in (self.cross_levels if kind == "cross" else self.self_levels)


class CaptureComplete(Exception):
    """Raised from inside a forward when a CaptureSpec's `stop_after` live maps are held; the caller catches it."""


@dataclass
class LiveMap:
    """One layer's maps from the current forward: probs [C*B, H, N, T] for the captured chunks (chunk-major)."""

    site: AttnSite
    kind: str
    grid: tuple[int, int]
    labels: tuple[int, ...]
    probs: torch.Tensor


@dataclass(eq=False)
class RunState:
    """Mutable state of ONE sampling call, created by the node that samples and cleared in its `finally`.

    Placed under keys.RUN in the transformer_options of that node's private model clone. `__deepcopy__` returns self
    so ComfyUI's model_options copies keep pointing at the same run.
    """

    sigmas: torch.Tensor
    roles: tuple[str, ...]
    capture: CaptureSpec | None = None
    step: int = 0
    image: int = 0  # which image of the node's batch this call processes (samplers run image by image)
    # sigma of the denoiser call in progress, as the host's (float32) sigma tensor holds it: attention calls read it
    # here instead of from extra_options["sigmas"], a device tensor whose read would synchronise with the GPU
    sigma: float | None = None
    # Wrapper knobs for the next UNet calls (see attention/hooks.py: unet wrapper)
    context_override: dict[int, torch.Tensor] = field(default_factory=dict)
    compute_labels: frozenset[int] | None = None
    fill: dict[int, torch.Tensor] = field(default_factory=dict)
    # flow models: the wrapper returns the diffusion model's raw velocity instead of the denoised x0
    velocity: bool = False
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    # ControlNet / T2I-Adapter outputs reach only the latent rows with these roles (None: every row). MaSaFusion feeds
    # the adapter to its intermediate image only.
    control_roles: frozenset[str] | None = None
    # Capture
    live: list[LiveMap] = field(default_factory=list)
    sums: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    grids: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # Free-form per-technique state (masks, banks), keyed by the technique
    scratch: dict[Any, Any] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False)  # memo / on_device / step_of

    def __deepcopy__(self, memo):
        return self

    @property
    def total_steps(self) -> int:
        return len(self.sigmas) - 1

    def step_of(self, sigma: float) -> int:
        """Index of the schedule sigma nearest to `sigma` (how patches find the step without counting calls)."""
        sigma = float(sigma)  # every attention call of a forward asks with the same sigma: compute once
        return self.memo(("step_of", sigma), lambda: int((self.sigmas[:-1].float() - sigma).abs().argmin()))

    def memo(self, key, make):
        """`make()` computed once per run: what every attention call of a step would otherwise recompute."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def on_device(self, key, make, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`make()` (a small constant a controller keeps on the CPU) copied to `device` / `dtype` once per run.

        Every attention call needs such constants (P2P's token windows and mappers); copying them from pageable host
        memory on every call would synchronise the GPU stream each time, so the CPU could no longer queue kernels
        ahead. Keyed also by inference mode: a copy made under the executor's inference mode is an inference tensor
        that autograd (MAG-Edit) may not save, so grad-mode calls get their own normal copy.
        """
        def copy():
            value = make()
            return value.to(device=device, dtype=dtype or value.dtype, copy=True)

        return self.memo(("on_device", key, device, dtype, torch.is_inference_mode_enabled()), copy)

    def record(self, call: AttnCall, probs: torch.Tensor) -> None:
        """Record post-edit probs of a captured layer (live per-head and/or running head-mean sums)."""
        spec = self.capture
        rows = [r for lab in sorted(spec.labels) for r in call.layout.rows(lab)]
        if not rows:
            return
        picked = probs[rows]
        labels = tuple(lab for lab in sorted(spec.labels) for _ in call.layout.chunks(lab))
        if spec.live:
            self.live.append(LiveMap(call.site, call.kind, call.grid, labels, picked))
        if spec.accumulate:
            key = (call.kind, call.site.level)
            mean = picked.detach().float().mean(1)
            chunked = mean.view(-1, call.layout.rows_per_chunk, *mean.shape[1:]).mean(0)  # chunks averaged
            self.sums[key] = self.sums[key] + chunked if key in self.sums else chunked
            self.counts[key] = self.counts.get(key, 0) + 1
            self.grids[key] = call.grid
        if spec.live and spec.stop_after is not None and len(self.live) >= spec.stop_after:
            raise CaptureComplete

    def mean_map(self, kind: str, level: int) -> torch.Tensor | None:
        """Running mean over recorded layers and steps, [B, N, T] (None if nothing was recorded)."""
        key = (kind, level)
        return None if key not in self.sums else self.sums[key] / self.counts[key]

    def captured(self) -> RunState:
        """A detached copy holding only what was captured (survives `clear`)."""
        snap = RunState(self.sigmas, self.roles, capture=self.capture, image=self.image)
        snap.sums, snap.counts, snap.grids = dict(self.sums), dict(self.counts), dict(self.grids)
        return snap

    def clear(self) -> None:
        """Drop every tensor reference (called in `finally` by the sampling node)."""
        self.context_override.clear()
        self.fill.clear()
        self.outputs.clear()
        self.live.clear()
        self.sums.clear()
        self.counts.clear()
        self.scratch.clear()
        self._memo.clear()
        self.compute_labels = None
        self.sigma = None
        self.velocity = False


@dataclass
class AttnCall:
    """Everything a controller may read about one attention call. q [R, N, H*D], k and v [R, T, H*D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    kind: str
    site: AttnSite
    grid: tuple[int, int]
    layout: BatchLayout
    run: RunState | None
    sigma: float
    _probs: torch.Tensor | None = None
    _step: int | None = None
    # Cross-attention only: {name: (k, v)} of context tokens that context patchers appended after the prompt's
    # tokens (hooks.add_context_patch); q/k/v above hold the prompt's tokens only.
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        """Step of the run's schedule this call belongs to (looked up once per call)."""
        if self.run is None:
            return None
        if self._step is None:
            self._step = self.run.step_of(self.sigma)
        return self._step

    def probs(self) -> torch.Tensor:
        """Unedited softmax attention [R, H, N, T] in float32 (computed once per call)."""
        if self._probs is None:
            self._probs = attention_probs(self.q, self.k, self.heads)
        return self._probs

    def role_rows(self, label: int, role: str) -> list[int]:
        """Rows of chunks with `label` whose latent row has `role`."""
        if self.run is None:
            return []
        branches = [i for i, r in enumerate(self.run.roles) if r == role]
        return [self.layout.row(c, b) for c in self.layout.chunks(label) for b in branches]


class Controller:
    """Base of every attention controller installed by a patch node (frozen subclasses).

    Contract: `active(call)` says whether the controller acts on this call; `edit_probs` rewrites the attention
    probabilities [R, H, N, T] (P2P), `edit_output` rewrites the attention output [R, N, H*D] (self-attention
    injection). Override `EDITS_PROBS` / `EDITS_OUTPUT` accordingly. Controllers never hold per-run state: that lives
    on `call.run`.
    """

    EDITS_PROBS = False
    EDITS_OUTPUT = False
    # An output editor whose edit also has a probability form sets this: its `edit_probs` then runs only when the
    # dispatcher computes the probabilities anyway (capture, another probability editor), so captured maps show the
    # edited attention without forcing materialised probabilities on every call. Its `edit_output` still decides the
    # output.
    EDITS_PROBS_IF_COMPUTED = False
    # Joint attention (Flux, attention/joint.py): a controller that replaces keys / values of the joint sequence (KV-Edit)
    # sets this and implements `edit_joint_kv`; it is asked `active` with the call's "self" (image -> image) slice.
    EDITS_JOINT_KV = False
    # A controller whose maths reads the inversion's own latents in the source rows (CPAM's K_i, V_i of z_i) sets this:
    # the edit sampler then pins the source rows to the inversion latents whatever its `source_branch` says.
    PINS_SOURCE = False
    # Controllers that define the edit's target prompt expose it so the edit sampler can use and check it.
    source_text: str | None = None
    target_text: str | None = None
    target_tokens: Any = None
    target_conditioning: list | None = None

    def __deepcopy__(self, memo):
        return self

    def active(self, call: AttnCall) -> bool:
        return False

    def edit_probs(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def edit_output(self, call: AttnCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def edit_joint_kv(self, call: AttnCall, k: torch.Tensor, v: torch.Tensor, text: int):
        """Joint attention only: (k, v) [R, H, T + N, D] (text tokens first) for every query of the call."""
        return k, v


def dispatch(call: AttnCall, controllers, default_attention) -> torch.Tensor:
    """Run the active controllers on one attention call; `default_attention()` when none acts and nothing is captured.

    Order: probability edits (in installation order; controllers with EDITS_PROBS_IF_COMPUTED join them only when
    probabilities are computed anyway) -> capture of the edited probs -> output = probs @ V -> output edits. With no
    active controller and no capture the host's own attention kernel runs, so an installed but inactive controller is
    bit-identical to the unpatched model.
    """
    active = [c for c in controllers if c.active(call)]
    run = call.run
    capture = run is not None and run.capture is not None and run.capture.wants(call.kind, call.site.level)
    prob_editors = [c for c in active if c.EDITS_PROBS]
    if prob_editors or capture:
        probs = call.probs()
        for ctrl in active:
            if ctrl.EDITS_PROBS or ctrl.EDITS_PROBS_IF_COMPUTED:
                probs = ctrl.edit_probs(call, probs)
        if capture:
            run.record(call, probs)
        out = apply_probs(probs, call.v, call.heads)
    else:
        out = default_attention()
    for ctrl in active:
        if ctrl.EDITS_OUTPUT:
            out = ctrl.edit_output(call, out)
    return out
