"""Which prompt tokens say something: routing pools over a prompt's content tokens only.

A question sent through a chat template carries the template's own tokens (role markers, often a
default system prompt) around the user's words; pooled with them, the routing value is about the
template, not the question (docs/routing.md: chat questions routed home 0.39 with every token,
0.95 with content tokens only, MEND ZsRE, layer 5). So routing keeps, per row:

- the last user turn when the row is a chat (found by the template's own user-turn header, learned
  once from the tokenizer by rendering a marker message), else every token;
- minus special tokens (BOS, turn markers) and the sequence's first token, which every causal LM
  uses as an attention sink whatever it is.

If that leaves nothing (a one-token prompt), the row keeps its original mask.
"""

from __future__ import annotations

from typing import Any

import torch

_MARKER = "Zq"  # a user message whose tokens are easy to find in the rendered template


class ContentTokens:
    """Computes content masks for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.special = special_ids(tokenizer)
        self.user_header, self.user_end = chat_markers(tokenizer)

    def mask(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and (B, T) mask of the positions to consider -> (B, T) mask of content positions."""
        out = torch.zeros_like(mask)
        ids_rows, mask_rows = input_ids.tolist(), (mask > 0).tolist()
        for row, (ids, keep) in enumerate(zip(ids_rows, mask_rows)):
            positions = [p for p, k in enumerate(keep) if k]
            chosen = self._content(ids, positions)
            if not chosen:  # nothing left: keep what the caller gave
                chosen = positions
            out[row, chosen] = 1
        return out

    def _content(self, ids: list[int], positions: list[int]) -> list[int]:
        if not positions:
            return []
        first_real = positions[0]
        turn = self._last_user_turn(ids, positions)
        if turn is not None:
            positions = [p for p in positions if turn[0] <= p < turn[1]]
        return [p for p in positions if p != first_real and ids[p] not in self.special]

    def _last_user_turn(self, ids: list[int], positions: list[int]) -> tuple[int, int] | None:
        """[start, end) of the last user message, when the row contains the template's user header."""
        header = self.user_header
        if not header:
            return None
        seq = [ids[p] for p in positions]
        n = len(header)
        for start in range(len(seq) - n, -1, -1):
            if seq[start : start + n] == header:
                begin = start + n
                end = len(seq)
                if self.user_end is not None and self.user_end in seq[begin:]:
                    end = seq.index(self.user_end, begin)
                return (positions[begin], positions[end] if end < len(seq) else positions[-1] + 1)
        return None


def special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def chat_markers(tokenizer: Any) -> tuple[list[int] | None, int | None]:
    """The chat template's user-turn header (token ids from its last special token up to the message)
    and the token that ends a user turn; (None, None) without a template or when they cannot be found."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=True,
                                                 add_generation_prompt=False)
    except Exception:  # a template that needs more than one user message: no chat handling
        return None, None
    ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    inner = list(tokenizer(_MARKER, add_special_tokens=False)["input_ids"])
    special = special_ids(tokenizer)
    for start in range(len(ids) - len(inner) + 1):
        if ids[start : start + len(inner)] == inner:
            before, after = ids[:start], ids[start + len(inner) :]
            specials = [k for k, t in enumerate(before) if t in special]
            if not specials:
                return None, None
            header = before[specials[-1] :]
            end = next((t for t in after if t in special), None)
            return header, end
    return None, None


def subject_positions(tokenizer: Any, prompt: str, subject: str | None) -> list[int]:
    """Positions of the prompt's tokens (as `tokenizer(prompt)` gives them) that overlap the subject's
    characters; [] when there is no subject, it is not in the prompt, or the tokenizer has no offsets."""
    if not subject or not subject.strip():
        return []
    at = prompt.find(subject)
    if at < 0:
        at = prompt.lower().find(subject.lower())
    if at < 0:
        return []
    end = at + len(subject)
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: no character offsets
        return []
    return [i for i, (start, stop) in enumerate(offsets) if start < end and stop > at and stop > start]
