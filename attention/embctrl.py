"""EmbCtrl, embedding control for shape-invariant edits (Li, Yi, Li: MaSaFusion paper, App. B.1, Alg. 4, Eq. 12).
Pure torch.

CLIP's text encoder is causal, so changing one word changes the embedding of every token after it (the words after it,
EOT and the padding the cross-attention also reads). Eq. 12 builds the target embedding from the source prompt's
embeddings and takes the target's only where the tokens changed:

    C~^T = { tau(S)_1, ..., tau(T)_i, ..., tau(S)_77 }   (i: the changed token positions).

Notation: T = 77 token positions, E embedding width (768 SD1, 1024 SD2, 2048 SDXL clip_l + clip_g).

SDXL: both encoders' hidden states share the token positions (they are concatenated along E), so Eq. 12 picks whole
rows and treats clip_l and clip_g alike. The pooled vector (clip_g's projected end-of-text state, a global UNet input)
has no token position; `control_options` takes the source's by default, as Eq. 12 keeps the source's end-of-text
embedding.
"""

from __future__ import annotations

import torch

from .seq_align import global_align
from .tokens import CHUNK, PromptError, PromptTokens, require_one_block

ALIGNMENTS = ("align tokens", "same token count only")
POOLED = ("source", "target")  # which prompt's pooled output the EmbCtrl conditioning carries (SDXL reads it)


def _end(tokens: PromptTokens) -> int:
    """Position of the EOT token of a one-chunk prompt (1 for an empty prompt)."""
    return tokens.last_word_position() + 1


def source_index(source: PromptTokens, target: PromptTokens, alignment: str = ALIGNMENTS[0]) -> torch.Tensor:
    """For each of the 77 target positions, the source position whose embedding it keeps, or -1 (changed token).

    Same token count: position by position, a token keeps the source embedding when its id is the source's at the
    same position (Eq. 12 exactly). Different counts: with alignment "align tokens", the real tokens (SOT..EOT) are
    aligned by global alignment (attention/seq_align.py, as Prompt-to-Prompt's refinement); matched tokens keep their
    aligned source embedding, inserted or substituted ones are changed, and the padding after EOT keeps the source
    padding at the same distance from EOT (clamped to the last position). "same token count only" rejects them.

    Differences: Eq. 12 assumes the prompts differ in place; the alignment extends it to words of other token lengths
    so that text after the changed word still keeps the source embeddings.
    """
    if alignment not in ALIGNMENTS:
        raise PromptError(f"`alignment` {alignment!r} is unknown; choose one of {', '.join(ALIGNMENTS)}")
    require_one_block(source, "source prompt", "EmbCtrl")
    require_one_block(target, "target prompt", "EmbCtrl")
    src_end, tgt_end = _end(source), _end(target)
    if src_end == tgt_end:
        same = [int(source.ids[j]) == int(target.ids[j]) for j in range(CHUNK)]
        return torch.tensor([j if s else -1 for j, s in enumerate(same)], dtype=torch.long)
    if alignment != ALIGNMENTS[0]:
        raise PromptError(
            f"the prompts have different token counts (source {source.text!r}: {src_end - 1} tokens, target "
            f"{target.text!r}: {tgt_end - 1}); with `alignment` 'same token count only' Eq. 12 needs the changed "
            "words to have the same token count. Choose words of equal length or set `alignment` to 'align tokens'.")
    x, y = list(source.ids[:src_end + 1]), list(target.ids[:tgt_end + 1])
    aligned = global_align(x, y)
    index = torch.full((CHUNK,), -1, dtype=torch.long)
    for j, i in enumerate(aligned):
        if i >= 0 and x[i] == y[j]:
            index[j] = i
    for j in range(tgt_end + 1, CHUNK):
        index[j] = min(j - tgt_end + src_end, CHUNK - 1)
    return index


def control_embedding(source: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Eq. 12: [B, 77, E] embedding whose position j is source[:, index[j]] where index[j] >= 0, else target[:, j]."""
    if source.shape[1] != CHUNK or target.shape[1] != CHUNK:
        raise PromptError(f"EmbCtrl needs one 77-token chunk per prompt; got {source.shape[1]} and {target.shape[1]} "
                          "tokens (a prompt longer than 75 tokens, or a CONDITIONING that is not a single prompt)")
    keep = (index >= 0).to(source.device)
    gathered = source[:, index.clamp_min(0).to(source.device)]
    return torch.where(keep.view(1, -1, 1), gathered.to(target.dtype), target)


def control_options(source: dict, target: dict, pooled: str = POOLED[0]) -> dict:
    """The conditioning options of C~^T: the target's, with the source's pooled output when `pooled` is "source".

    Differences: Eq. 12 covers the token embeddings only (SD1.5 has no pooled input); for SDXL the pooled vector is
    made from the end-of-text token, which Eq. 12 keeps from the source, so the source's pooled output is the
    consistent default.
    """
    if pooled not in POOLED:
        raise PromptError(f"`pooled` {pooled!r} is unknown; choose {' or '.join(POOLED)}")
    options = dict(target)
    if pooled == POOLED[0] and source.get("pooled_output") is not None:
        options["pooled_output"] = source["pooled_output"]
    return options


def describe(target: PromptTokens, index: torch.Tensor) -> str:
    """The target tokens that take the target embedding (for the node's report)."""
    changed = [target.pieces[j] for j in range(min(CHUNK, len(target.pieces))) if int(index[j]) < 0]
    return ", ".join(changed) if changed else "(none: the prompts tokenise identically)"
