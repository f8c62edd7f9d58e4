"""Text conditioning with learnable token-embedding rows (Dynamic Prompt Learning's per-step noun tokens).

DPL (Wang et al., NeurIPS 2023, Sec. 3.2) learns the *input* token embeddings of the prompt's nouns and re-encodes the
prompt with ComfyUI's own CLIP text model after every update, so the gradient of the attention losses flows through
the frozen text transformer into those rows only.

How, portably on both hosts: the token-embedding module of each CLIP text encoder is swapped, for the duration of one
`encode` call and through the public `set_input_embeddings` method (the mechanism ComfyUI itself uses for textual
inversion), for `RowOverride`, which returns the host's own embeddings with the noun positions replaced by the
learned rows. Everything else (clip skip, prompt weights, SDXL's two encoders, pooled output, device placement) is the
host's encoding path, so with the initial rows the result is bit-identical to CLIPTextEncode. The original module is
restored in `finally`. Duck-typed over ComfyUI's CLIP object (no `comfy` import).

Differences from the reference code: the reference adds placeholder words to the tokenizer and trains the whole
embedding table while restoring every other row after each step; here only the rows of the noun positions exist as
trainable tensors (one row per token position of every occurrence), so other rows cannot change at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from ..attention.tokens import CHUNK, PromptTokens

ENCODER_NAMES = ("clip_l", "clip_h", "clip_g")  # sub-encoders of ComfyUI's SD1 / SD2 / SDXL CLIP models


class LearnedRowsError(ValueError):
    """The prompt cannot carry learned rows (message says why and what to change)."""


class RowOverride(torch.nn.Module):
    """Token-embedding module: the host's embedding with the rows at `positions` of matching sequences replaced.

    A sequence (one 77-token chunk) matches chunk c when its token ids equal `chunk_ids[c]`; other sequences (the
    empty prompt ComfyUI adds for weighted prompts, other prompts) pass through untouched. `hits` counts replacements.
    """

    def __init__(self, base: torch.nn.Module, chunk_ids: torch.Tensor, positions: Sequence[int], rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.chunk_ids = chunk_ids  # [chunks, 77]
        self.positions = list(positions)  # prompt-wide token positions
        self.rows = rows  # [P, E]
        self.hits = 0

    @property
    def weight(self) -> torch.Tensor:  # the host reads .weight for its device and vocabulary size
        return self.base.weight

    def forward(self, input_tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(input_tokens, *args, **kwargs)
        if input_tokens.ndim != 2 or input_tokens.shape[1] != self.chunk_ids.shape[1]:
            return out
        expected = self.chunk_ids.to(input_tokens.device)
        pieces = []
        for r in range(input_tokens.shape[0]):
            row = out[r]
            match = (input_tokens[r].unsqueeze(0) == expected).all(-1).nonzero()
            if len(match):
                row = self._replace(row, int(match[0]))
            pieces.append(row)
        return torch.stack(pieces)

    def _replace(self, row: torch.Tensor, chunk: int) -> torch.Tensor:
        picked = [(i, p % CHUNK) for i, p in enumerate(self.positions) if p // CHUNK == chunk]
        if not picked:
            return row
        self.hits += 1
        index = torch.tensor([o for _, o in picked], device=row.device)
        values = self.rows[[i for i, _ in picked]].to(device=row.device, dtype=row.dtype)
        mask = torch.zeros(row.shape[0], 1, dtype=torch.bool, device=row.device)
        mask[index] = True
        return torch.where(mask, torch.zeros_like(row).index_put((index,), values), row)


def text_encoders(clip) -> dict[str, torch.nn.Module]:
    """{token key ("l", "h", "g"): CLIP text transformer} of a ComfyUI CLIP (SD1.x, SD2.x, SDXL)."""
    model = clip.cond_stage_model
    found = {}
    for name in ENCODER_NAMES:
        sub = getattr(model, name, None)
        transformer = getattr(sub, "transformer", None)
        if transformer is not None and hasattr(transformer, "get_input_embeddings"):
            found[name[-1]] = transformer
    if not found:
        raise LearnedRowsError(f"the connected CLIP ({type(model).__name__}) has no CLIP text encoder whose token "
                               "embeddings can be learned; connect the CLIP of an SD1.x, SD2.x or SDXL checkpoint")
    return found


class RowEncoder:
    """Encodes one prompt with learnable rows at given token positions, through the host's CLIP.

    rows: {token key: [P, E_key] float32}, P = len(positions), one row per position (all tokens of every noun).
    """

    def __init__(self, clip, prompt: PromptTokens, positions: Sequence[int]):
        self.clip = clip
        self.tokens = clip.tokenize(prompt.text)
        self.positions = list(positions)
        self.encoders = {k: t for k, t in text_encoders(clip).items() if k in self.tokens}
        self.chunk_ids = {k: self._chunk_ids(k) for k in self.encoders}

    def _chunk_ids(self, key: str) -> torch.Tensor:
        chunks = self.tokens[key]
        ids = [[int(item[0]) if isinstance(item[0], int) else -1 for item in chunk] for chunk in chunks]
        if any(-1 in c for c in ids):
            raise LearnedRowsError("the source prompt contains a textual-inversion embedding (embedding:...); DPL "
                                   "learns plain word tokens only. Remove the embedding from the prompt.")
        return torch.tensor(ids)

    def initial_rows(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The original token embeddings of the positions (Alg. 1, line 6: V_T = the original noun tokens)."""
        rows = {}
        for key, transformer in self.encoders.items():
            table = transformer.get_input_embeddings().weight
            flat = self.chunk_ids[key].flatten()
            ids = flat[torch.tensor(self.positions)].to(table.device)
            rows[key] = table.detach()[ids].float().to(device).clone()
        return rows

    @contextmanager
    def _installed(self, rows: dict[str, torch.Tensor]) -> Iterator[list[RowOverride]]:
        swapped = []
        try:
            for key, transformer in self.encoders.items():
                base = transformer.get_input_embeddings()
                override = RowOverride(base, self.chunk_ids[key], self.positions, rows[key])
                transformer.set_input_embeddings(override)
                swapped.append((transformer, base, override))
            yield [o for _, _, o in swapped]
        finally:
            for transformer, base, _ in swapped:
                transformer.set_input_embeddings(base)

    def encode(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-attention context [1, T, E] of the prompt with `rows` at the positions (differentiable in rows).

        Same path as core CLIPTextEncode's `encode_from_tokens` minus model loading (the caller loads the CLIP once).
        """
        model = self.clip.cond_stage_model
        model.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        # CLIP layers add residuals in place: copy what autograd saves so the in-place add cannot invalidate it
        copies = torch.autograd.graph.saved_tensors_hooks(_save_copy, _identity) if torch.is_grad_enabled() \
            else nullcontext()
        with self._installed(rows) as overrides, copies:
            out = model.encode_token_weights(self.tokens)
        if not all(o.hits for o in overrides):
            raise LearnedRowsError("the text encoder did not use the learned noun rows (the prompt's tokens changed "
                                   "during encoding); remove embeddings or unusual syntax from the source prompt")
        return out[0]


def _save_copy(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def load(clip) -> None:
    """Load the CLIP's weights on its device once (core `encode_from_tokens` does this on every call)."""
    if hasattr(clip, "load_model"):
        clip.load_model()
