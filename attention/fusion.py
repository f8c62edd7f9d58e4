"""MaSaFusion self-attention fusion (Li, Yi, Li: "Mask-informed Self-Attention Fusion", Sec. 4.2-4.3, Alg. 1,
Eq. 9-10; App. C Alg. 5, Eq. 13-14). Pure torch.

The paper writes every fused noise prediction as a UNet pass whose self-attention modules are substituted:
- eps_bar (Eq. 9, used for pixels outside the edit region A): every Attention_SA(Q, K, V) of the row is replaced by the
  source branch's Attention_SA(Q^S, K^S, V^S), the prompt is the source prompt C^S;
- eps_hat (Eq. 10, inside A, with the T2I-Adapter): Attention_SA(Q^t2i, K^t2i, V^T): the intermediate image's
  attention map applied to the target's own values, so "the self-attention map of x^T is exactly the one of x^t2i";
- eps_hat w/o t2i (Eq. 13-14, App. C, no adapter): Attention_SA(Q^T, K^S, V^S), MasaCtrl's mutual self-attention.

The sampler (inversion/fusion.py) runs all these passes in ONE UNet batch whose latent rows carry roles; this module's
controller rewrites the self-attention output of each substituted row from the q/k/v rows of the same call (same
step, same layer, same CFG chunk), so nothing is cached across steps.

Notation: R rows of the UNet call, H heads, N pixels, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import attention_probs, masked_attention
from .run import AttnCall, Controller

# Latent-row roles of a fusion run (RunState.roles). Pairs (t2i_bar, t2i) and (target_bar, target) share one latent.
SOURCE = "source"  # x^S: regenerates the inverted image (own attention, C^S)
T2I_BAR = "t2i_bar"  # eps_bar(x^t2i, C^S, C^t2i): Eq. 9, i not in A
T2I = "t2i"  # eps(x^t2i, C^T, C^t2i): Eq. 9, i in A
TARGET_BAR = "target_bar"  # eps_bar(x^T, C^S): Eq. 10 / 14, i not in A
TARGET = "target"  # eps_hat(x^T, x^t2i, C^T): Eq. 10 (or Eq. 13 without adapter), i in A

# (q role, k role, v role) of every substituted row.
ALG1_SOURCES = (  # Alg. 1: with a T2I-Adapter intermediate image
    (T2I_BAR, (SOURCE, SOURCE, SOURCE)),
    (TARGET_BAR, (SOURCE, SOURCE, SOURCE)),
    (TARGET, (T2I, T2I, TARGET)),
)
ALG5_SOURCES = (  # Alg. 5: no adapter
    (TARGET_BAR, (SOURCE, SOURCE, SOURCE)),
    (TARGET, (TARGET, SOURCE, SOURCE)),
)
ALG1_ROLES = (SOURCE, T2I_BAR, T2I, TARGET_BAR, TARGET)
ALG5_ROLES = (SOURCE, TARGET_BAR, TARGET)
SOURCE_PROMPT_ROLES = frozenset({SOURCE, T2I_BAR, TARGET_BAR})  # rows conditioned on C^S (the others on C^T)

PAPER_STEPS = 50  # the paper's DDIM schedule (Sec. 5 "Setup"): step knobs are given on a 50-step schedule
LAYERS = ("all", "decoder")  # paper: "all the Attention_SA"; decoder: MasaCtrl's layers (up blocks, two finest levels)
DECODER_MAX_LEVEL = 2  # MasaCtrl layers 10-15 = output blocks 6-11 = the 32x32 and 64x64 levels of a 64x64 latent


def scaled_start_step(start_step: int, steps: int, paper_steps: int = PAPER_STEPS) -> int:
    """The first fused step of a `steps`-step run for a start step given on the paper's 50-step schedule.

    ceil(start_step * steps / 50): the same fraction of the run, so that any start_step > 0 still leaves at least one
    unfused step (MasaCtrl's 4 of 50 is 1 of 10, 2 of 20, 4 of 50). The paper fuses from the first step (0).
    Differences: the paper gives no rule for other step counts (it always runs 50 DDIM steps); rounding up is ours.
    """
    return -(-int(start_step) * int(steps) // int(paper_steps))


def substituted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          plan: list[tuple[list[int], list[int], list[int], list[int]]]) -> dict[int, torch.Tensor]:
    """{row: Attention(Q[qr], K[kr], V[vr]) [N, H*D]} for every (rows, q_rows, k_rows, v_rows) of `plan` (Eq. 10, 13).

    softmax(Q K^T / sqrt(D)) V through SDPA, without materialising the probabilities.
    """
    out: dict[int, torch.Tensor] = {}
    for rows, q_rows, k_rows, v_rows in plan:
        if not rows:
            continue
        result = masked_attention(q[q_rows], k[k_rows], v[v_rows], heads)
        out.update({r: result[j] for j, r in enumerate(rows)})
    return out


def substituted_probs(probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, heads: int,
                      plan: list[tuple[list[int], list[int], list[int], list[int]]]) -> torch.Tensor:
    """probs [R, H, N, T] with each planned row's map replaced by softmax(Q[qr] K[kr]^T / sqrt(D)) (the map of the
    substituted attention; what a capture records)."""
    probs = probs.clone()
    for rows, q_rows, k_rows, _v_rows in plan:
        if not rows:
            continue
        if q_rows == k_rows:
            probs[rows] = probs[q_rows]
        else:
            probs[rows] = attention_probs(q[q_rows], k[k_rows], heads).to(probs)
    return probs


@dataclass(frozen=True, eq=False)
class MaskedSelfAttentionFusion(Controller):
    """Self-attention substitution of MaSaFusion for every row whose role is in `sources`.

    sources: ((role, (q_role, k_role, v_role)), ...) e.g. ALG1_SOURCES. Active on self-attention from step
    `start_step` on, at every layer ("all") or only MasaCtrl's decoder layers ("decoder"). Rows whose three roles are
    the source take the source row's output itself (Attention(Q^S, K^S, V^S) is the source's own attention), the others
    are computed from this call's q/k/v; each CFG chunk reads its own chunk's rows.

    Differences: the paper caches (Q, K, V) per step and layer from separate passes; here every pass runs in one batch
    of the same step, which gives the same tensors (Alg. 1 line 5 and line 8 run in lock-step) without the cache.
    """

    sources: tuple
    start_step: int = 0
    layers: str = "all"

    EDITS_OUTPUT = True
    EDITS_PROBS_IF_COMPUTED = True

    def active(self, call: AttnCall) -> bool:
        if call.kind != "self" or call.run is None or call.step < self.start_step:
            return False
        if self.layers == "decoder" and (call.site.block != "output" or call.site.level > DECODER_MAX_LEVEL):
            return False
        needed = {role for role, qkv in self.sources for role in (role, *qkv)}
        return needed <= set(call.run.roles)  # only in fusion runs (never in a plain source/target edit)

    def _plan(self, call: AttnCall):
        plan, copies = [], []
        for label in sorted(set(call.layout.labels)):
            for role, (qr, kr, vr) in self.sources:
                rows = call.role_rows(label, role)
                q_rows, k_rows, v_rows = (call.role_rows(label, r) for r in (qr, kr, vr))
                if not rows or not (len(rows) == len(q_rows) == len(k_rows) == len(v_rows)):
                    continue
                if qr == kr == vr and qr != role:
                    copies.append((rows, q_rows))
                else:
                    plan.append((rows, q_rows, k_rows, v_rows))
        return plan, copies

    def edit_probs(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        plan, copies = self._plan(call)
        plan = plan + [(rows, src, src, src) for rows, src in copies]
        return substituted_probs(probs, call.q, call.k, call.heads, plan)

    def edit_output(self, call: AttnCall, out: torch.Tensor) -> torch.Tensor:
        plan, copies = self._plan(call)
        out = out.clone()
        for rows, src in copies:
            out[rows] = out[src]
        for row, value in substituted_attention(call.q, call.k, call.v, call.heads, plan).items():
            out[row] = value.to(out)
        return out

