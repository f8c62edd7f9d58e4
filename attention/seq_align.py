"""Token alignment between a source and a target prompt for Prompt-to-Prompt (Hertz et al., ICLR 2023, Sec. 3.2).

- Word swap ("replace"): prompts with the same number of words; a word-level mapper M [T, T] with
  target column j = sum_i A_src[:, i] * M[i, j] (Eq. in Sec. 3.2, "Word Swap").
- Refinement ("refine"): tokens aligned by global (Needleman-Wunsch) alignment; target token j reads source token
  mapper[j] when alpha[j] = 1 and keeps its own attention when it is new (alpha[j] = 0) ("Adding a New Phrase").

Pure python/torch. Prompts come as attention.tokens.PromptTokens (one 77-token chunk).
"""

from __future__ import annotations

import torch

from .tokens import PromptError, PromptTokens, require_one_block

NW_GAP, NW_MATCH, NW_MISMATCH = 0, 1, -1  # scores of the reference aligner (a substituted word counts as new)


def _words(tokens: PromptTokens) -> list[list[int]]:
    """Token positions of each word, in order (word ids from ComfyUI's tokenizer)."""
    groups: dict[int, list[int]] = {}
    for pos, wid in enumerate(tokens.word_ids[:tokens.length]):
        if wid > 0:
            groups.setdefault(wid, []).append(pos)
    return [groups[k] for k in sorted(groups)]


def _same_length(source: PromptTokens, target: PromptTokens) -> int:
    if source.length != target.length:
        raise PromptError(f"the source prompt was tokenised for a {source.length}-token context and the target for "
                          f"{target.length}; tokenise both with the same CLIP.")
    return source.length


def replacement_mapper(source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """Word-swap mapper M [L, L] (rows: source tokens, columns: target tokens; L = 77 for CLIP, 256 for Flux's T5).

    Unchanged words and swapped words of equal token length map token to token; a swapped word of m source and n
    target tokens gives each of its target tokens 1/n of the sum of the m source tokens (reference code). SOT, EOT and
    padding map position to position after the last word.

    Differences from the reference (prompt-to-prompt `get_replacement_mapper_`), both deliberate:
    - Positions after the last swapped word: the reference maps every one of them j -> j (target token j reads source
      token j). When a swapped word changed its token count (m source, n target tokens, m != n) that shifts every later
      position by n - m, so here the unchanged words after it are mapped word to word (each target token reads the
      same word's source token) and the tail (EOT, padding) reads the source tail: those unchanged words AND the tail
      differ from the reference. With equal token counts (the usual one-token swap) the mapper is the reference's.
    - Word boundaries: the reference splits prompts on spaces, so punctuation glued to a word ("cat,") is part of it;
      here words are CLIP's BPE words, where a punctuation mark is a word of its own. A mark glued to a swapped word
      therefore maps 1:1 to its counterpart instead of sharing the word's 1/n split, and word counts differ from the
      reference's when punctuation is glued ("a cat, sitting" has 4 words here, 3 there; "a dog sitting" is refused as
      a swap target here, accepted there).
    """
    require_one_block(source, "source prompt", "Prompt-to-Prompt")
    require_one_block(target, "target prompt", "Prompt-to-Prompt")
    length = _same_length(source, target)
    src_words, tgt_words = _words(source), _words(target)
    if len(src_words) != len(tgt_words):
        raise PromptError(
            f"word swap needs prompts with the same number of words: source {source.text!r} has {len(src_words)}, "
            f"target {target.text!r} has {len(tgt_words)}. Use edit mode 'refine' to add or remove words.")
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0  # SOT (T5 has none: position 0 is the first word's and is set below)
    for sw, tw in zip(src_words, tgt_words):
        if len(sw) == len(tw):
            mapper[sw, tw] = 1.0
        else:
            for j in tw:
                mapper[sw, j] = 1.0 / len(tw)
    i, j = src_words[-1][-1] + 1 if src_words else 1, tgt_words[-1][-1] + 1 if tgt_words else 1
    while j < length:
        mapper[min(i, length - 1), j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def global_align(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment of y onto x: for each position of y, the aligned index in x or -1 (inserted).

    Scores: gap 0, match +1, mismatch -1; ties prefer left (insertion in y), then up (deletion), then diagonal, as the
    reference aligner does, so results match it token for token.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0], trace[i][0] = i * NW_GAP, 2
    for j in range(1, m + 1):
        score[0][j], trace[0][j] = j * NW_GAP, 1
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i][j - 1] + NW_GAP
            up = score[i - 1][j] + NW_GAP
            diag = score[i - 1][j - 1] + (NW_MATCH if x[i - 1] == y[j - 1] else NW_MISMATCH)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    mapping = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == 3:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif move == 1:
            j -= 1
            mapping[j] = -1
        else:
            i -= 1
    return mapping


def refinement_mapper(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper [L] long, alphas [L]) for refinement: target token j reads source token mapper[j] where alphas[j] = 1.

    The alignment runs on the real token ids including SOT and EOT; padding positions map to themselves.
    """
    require_one_block(source, "source prompt", "Prompt-to-Prompt")
    require_one_block(target, "target prompt", "Prompt-to-Prompt")
    length = _same_length(source, target)
    x = list(source.ids[: source.last_word_position() + 2])
    y = list(target.ids[: target.last_word_position() + 2])
    aligned = global_align(x, y)
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    for j, i in enumerate(aligned):
        mapper[j] = i if i >= 0 else 0
        alphas[j] = 1.0 if i >= 0 else 0.0
    return mapper, alphas
