"""Prompts as CLIP token sequences, and words as token spans in them.

ComfyUI tokenises a prompt word by word (split on spaces after parsing `(word:1.2)` weights), so a word of the
prompt is always a contiguous run of token ids, and tokenising the same word alone gives the same ids. A word given
by the user is therefore found by sub-sequence search of its ids, which handles multi-token words ("sunflower" ->
sun flower), case (CLIP lower-cases) and punctuation ("cat," contains the run of "cat"), and works identically for
SD1.x (clip_l), SD2.x (clip_h) and SDXL (clip_l and clip_g share the same BPE and token positions).

Flux: the attention sees T5-XXL's sequence (ComfyUI comfy/text_encoders/flux.py: sentencepiece pieces, no start token,
an end token, padded to 256 tokens and longer for longer prompts); clip_l only gives a pooled vector without token
positions. A Flux CLIP's prompts are therefore tokenised with T5, where a piece starting with "▁" begins a word.

Differences from the P2P reference (`get_word_inds`): that helper compares split words as exact, case-sensitive
strings and silently returns nothing for "Cat" or "mirror,"; here a word that is not found is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK = 77  # CLIP context length: ComfyUI encodes longer prompts as several 77-token chunks
T5_LENGTH = 256  # Flux's T5 sequence: T5XXLTokenizer(min_length=256) in ComfyUI comfy/text_encoders/flux.py
T5_WORD_START = "\u2581"  # sentencepiece's word-boundary mark ("▁") at the start of a word's first piece


class PromptError(ValueError):
    """A word or prompt that cannot be used as asked (message says what and how to fix it)."""


@dataclass(frozen=True)
class PromptTokens:
    """A prompt's token ids (all chunks concatenated), their readable pieces and word ids (0 = SOT/EOT/pad)."""

    text: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    word_ids: tuple[int, ...]
    end_token: int
    length: int = CHUNK  # tokens one attention context block holds: 77 (a CLIP chunk) or T5's 256 (Flux)
    encoder: str = "clip"  # "clip" or "t5"

    @property
    def chunks(self) -> int:
        return max(len(self.ids) // self.length, 1)

    @property
    def overlong(self) -> bool:
        """True when the prompt does not fit one block (CLIP: more than 75 tokens; T5: more than 255 + end)."""
        return len(self.ids) > self.length or self.last_word_position() >= self.length - 1

    @property
    def readable(self) -> str:
        """The real tokens of the prompt (no SOT/EOT/padding), for error messages."""
        return ", ".join(p for p, w in zip(self.pieces, self.word_ids) if w > 0) or "(none)"

    def word_groups(self) -> list[tuple[list[int], str]]:
        """(positions, text) of each prompt word, text lower-cased with surrounding punctuation stripped."""
        groups: dict[int, list[int]] = {}
        for pos, wid in enumerate(self.word_ids):
            if wid > 0:
                groups.setdefault(wid, []).append(pos)
        return [(pos, clean_word("".join(self.pieces[p] for p in pos)).lower()) for _, pos in sorted(groups.items())]

    def find_text(self, word: str, label: str = "prompt") -> list[int]:
        """Token positions of `word` (one or more whole words of the prompt) without a tokenizer at hand."""
        wanted = [w.lower() for w in clean_word(word).split()]
        groups = self.word_groups()
        hits = [p for i in range(len(groups) - len(wanted) + 1)
                if [g[1] for g in groups[i:i + len(wanted)]] == wanted for g in groups[i:i + len(wanted)] for p in g[0]]
        if not wanted or not hits:
            raise PromptError(f"the word {word!r} is not in the {label} {self.text!r}; its words are: "
                              f"{', '.join(g[1] for g in groups) or '(none)'}.")
        return hits

    def last_word_position(self) -> int:
        return max((i for i, w in enumerate(self.word_ids) if w > 0), default=0)

    def find(self, word_ids: list[int], word: str, label: str = "prompt") -> list[int]:
        """Token positions of every occurrence of the id run `word_ids` (the tokenised `word`)."""
        if not word_ids:
            raise PromptError(f"{label} word {word!r} is empty after removing punctuation; give a word of the "
                              f"{label} ({self.readable})")
        n = len(word_ids)
        hits = [i for i in range(len(self.ids) - n + 1)
                if list(self.ids[i:i + n]) == word_ids and all(w > 0 for w in self.word_ids[i:i + n])]
        if not hits:
            hint = (" T5 (Flux) splits a word by its exact spelling in the prompt: give the word as the prompt writes "
                    "it, with its case and without glued punctuation." if self.encoder == "t5" else "")
            raise PromptError(f"the word {word!r} is not in the {label} {self.text!r}; its tokens are: "
                              f"{self.readable}. Use a word of that prompt (or fix the prompt).{hint}")
        return [i + k for i in hits for k in range(n)]


def clean_word(word: str) -> str:
    """Strip weight syntax and surrounding punctuation from a user word: "(Cat:1.2)," -> "Cat"."""
    word = re.sub(r":\s*-?[\d.]+\s*\)?$", "", word.strip())
    return word.strip(" \t\n()[]{}.,;:!?\"'")


def split_words(spec: str) -> list[str]:
    """A comma-separated word list from a widget ("cat, red car" -> ["cat", "red car"]); empty items dropped."""
    return [w for w in (clean_word(x) for x in spec.split(",")) if w]


# ----------------------------------------------------------------------------------------- CLIP (duck-typed)
def _t5_tokenizer(clip):
    """Flux's T5 sub-tokenizer (ComfyUI FluxTokenizer.t5xxl), or None for CLIP-only text encoders and for SD3's
    SD3Tokenizer (clip_l, clip_g and t5xxl: its context starts with the 77 clip_l / clip_g tokens, whose positions
    are the CLIP ones, so SD3 prompts are tokenised as CLIP prompts; docs/flux.md, SD3)."""
    tok = clip.tokenizer
    if not hasattr(tok, "clip_l") or hasattr(tok, "clip_g"):
        return None
    return getattr(tok, "t5xxl", None)


def _sub_tokenizer(clip):
    tok = clip.tokenizer
    for name in ("clip_l", "clip_h", "clip_g"):
        sub = getattr(tok, name, None)
        if sub is not None:
            return sub
    raise PromptError(f"unsupported text encoder {type(tok).__name__}: word lookup needs a CLIP tokenizer "
                      "(SD1.x, SD2.x or SDXL)")


def word_ids_from_pieces(ids: list[int], raw_pieces: list[str], start: int, end: int) -> list[int]:
    """1-based word index of every token, 0 for SOT, EOT and padding.

    Words are recovered from the BPE itself: a CLIP token that ends a word carries the "</w>" suffix, so a word is a
    run of real tokens closed by such a token (punctuation marks are words of their own). This does not depend on
    how the host groups its word ids (ComfyUI 2024 tokenises word by word, current ComfyUI whole segments).
    """
    out, word, in_chunk_text = [], 1, False
    for pos, (token, piece) in enumerate(zip(ids, raw_pieces)):
        if pos % CHUNK == 0:
            in_chunk_text = token == start
            out.append(0)
            continue
        if not in_chunk_text or token == end:
            in_chunk_text = False
            out.append(0)
            continue
        out.append(word)
        if piece.endswith("</w>") or token < 0:
            word += 1
    return out


def t5_word_ids(raw_pieces: list[str], ids: list[int], end: int, pad: int) -> list[int]:
    """1-based word index of every T5 token, 0 for the end token and padding.

    A sentencepiece piece that starts with "▁" begins a word; the pieces after it without the mark (the rest of a
    split word, glued punctuation) belong to the same word.
    """
    out, word = [], 0
    for token, piece in zip(ids, raw_pieces):
        if token in (end, pad):
            out.append(0)
            continue
        if piece.startswith(T5_WORD_START) or word == 0:
            word += 1
        out.append(word)
    return out


def _tokenize_t5(clip, text: str) -> PromptTokens:
    sub = _t5_tokenizer(clip)
    ids = [int(item[0]) if isinstance(item[0], int) else -1 for chunk in clip.tokenize(text)["t5xxl"] for item in chunk]
    raw = [sub.inv_vocab.get(i, "<emb>") for i in ids]
    end, pad = int(sub.end_token), int(getattr(sub, "pad_token", 0))
    pieces = tuple(p.replace(T5_WORD_START, "") for p in raw)
    return PromptTokens(text, tuple(ids), pieces, tuple(t5_word_ids(raw, ids, end, pad)), end,
                        length=max(int(getattr(sub, "min_length", T5_LENGTH) or T5_LENGTH), 1), encoder="t5")


def tokenize_prompt(clip, text: str) -> PromptTokens:
    """PromptTokens of `text` exactly as `clip.tokenize` (and so CLIPTextEncode) produces them (T5 for Flux)."""
    if _t5_tokenizer(clip) is not None:
        return _tokenize_t5(clip, text)
    batches = clip.tokenize(text)
    key = next((k for k in ("l", "h", "g") if k in batches), next(iter(batches)))
    sub = _sub_tokenizer(clip)
    ids = [int(item[0]) if isinstance(item[0], int) else -1 for chunk in batches[key] for item in chunk]
    raw = [sub.inv_vocab.get(i, "<emb></w>") for i in ids]  # -1: a textual-inversion embedding vector
    start, end = int(getattr(sub, "start_token", 49406)), int(getattr(sub, "end_token", 49407))
    word_ids = word_ids_from_pieces(ids, raw, start, end)
    pieces = tuple(p.replace("</w>", "") for p in raw)
    return PromptTokens(text, tuple(ids), pieces, tuple(word_ids), end)


def word_token_ids(clip, word: str) -> list[int]:
    """Ids of `word` tokenised alone, word by word as ComfyUI does (multi-word phrases allowed; T5 for Flux)."""
    sub = _t5_tokenizer(clip) or _sub_tokenizer(clip)
    start = getattr(sub, "tokens_start", 1)
    ids: list[int] = []
    for piece in clean_word(word).split():
        ids += list(sub.tokenizer(piece)["input_ids"][start:-1])
    return ids


def word_positions(clip, prompt: PromptTokens, words: list[str], label: str = "prompt") -> dict[str, list[int]]:
    """{word: token positions} for each word; raises PromptError naming the first missing word."""
    return {w: prompt.find(word_token_ids(clip, w), w, label) for w in words}


def parse_word_values(spec: str, name: str) -> list[tuple[str, float]]:
    """Parse "cat=2, red car=0.5" into [("cat", 2.0), ("red car", 0.5)] with a clear error on bad items."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        word, sep, value = item.rpartition("=")
        try:
            if not sep or not clean_word(word):
                raise ValueError
            out.append((clean_word(word), float(value)))
        except ValueError:
            raise PromptError(f"`{name}` item {item!r} is not of the form word=number (e.g. \"cat=2.0, dog=0.5\")") \
                from None
    return out


def require_one_block(tokens: PromptTokens, label: str, technique: str) -> None:
    """Refuse a prompt that does not fit one attention context block (`tokens.overlong`): a CLIP chunk of 75 tokens,
    or Flux's T5 sequence of 255 tokens and the end token. `label` names the input, `technique` the node's method."""
    if not tokens.overlong:
        return
    if tokens.encoder == "t5":
        raise PromptError(f"the {label} {tokens.text!r} has {tokens.last_word_position() + 2} T5 tokens; {technique} "
                          f"on Flux needs both prompts within T5's {tokens.length}-token sequence ({tokens.length - 1} "
                          "tokens and the end token). Shorten it.")
    raise PromptError(f"the {label} {tokens.text!r} is longer than {CHUNK - 2} tokens; {technique} needs both prompts "
                      "within one CLIP chunk. Shorten it.")
