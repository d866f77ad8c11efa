"""Tokenise (prompt, answer) pairs into teacher-forced batches and score them at answer positions only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass
class TeacherForcedBatch:
    """Right-padded `prompt + " " + answer` sequences and where each answer token is predicted."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    prompt_mask: torch.Tensor  # (B, T), 1 on prompt tokens: what routing pools over
    rows: torch.Tensor  # (N,) row of each answer token
    positions: torch.Tensor  # (N,) logit position that predicts it (its index - 1)
    targets: torch.Tensor  # (N,) the answer token id
    follows: torch.Tensor | None = None  # (N,) True where the token follows the answer (see encode_pairs)

    def to(self, device: torch.device | str) -> "TeacherForcedBatch":
        moved = [getattr(self, f) for f in self.__dataclass_fields__]
        return TeacherForcedBatch(*(t.to(device) if t is not None else None for t in moved))

    def answer_only(self) -> torch.Tensor:
        """(N,) True on the answer's own tokens (not on what follows them)."""
        return ~self.follows if self.follows is not None else torch.ones_like(self.targets, dtype=torch.bool)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: Sequence[int]) -> tuple["TeacherForcedBatch", torch.Tensor]:
        """These rows alone, cut to their own width (right padding makes that exact), and the (n,) indices
        of their answer tokens in this batch, in the order the part lists them."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.input_ids.device)  # (b,)
        width = int(self.attention_mask[index].sum(dim=1).max())
        new_row = torch.full((self.size,), -1, dtype=torch.long, device=self.rows.device)
        new_row[index.to(self.rows.device)] = torch.arange(len(index), device=self.rows.device)
        tokens = (new_row[self.rows] >= 0).nonzero(as_tuple=True)[0]  # (n,)
        part = TeacherForcedBatch(
            self.input_ids[index, :width], self.attention_mask[index, :width], self.prompt_mask[index, :width],
            new_row[self.rows[tokens]], self.positions[tokens], self.targets[tokens],
            self.follows[tokens] if self.follows is not None else None,
        )
        return part, tokens


def length_groups(lengths: Sequence[int], min_saving: float = 0.25) -> list[list[int]]:
    """Rows in one group, or in two by length when padding them separately saves at least `min_saving` of
    the padded tokens (a batch of short prompts and long chat turns): each group is then run on its own."""
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    ranked = [lengths[row] for row in order]
    whole = len(ranked) * ranked[-1]
    best, cut = whole, 0
    for k in range(1, len(ranked)):
        cost = k * ranked[k - 1] + (len(ranked) - k) * ranked[-1]
        if cost < best:
            best, cut = cost, k
    if cut == 0 or best > (1 - min_saving) * whole:
        return [list(range(len(lengths)))]
    return [sorted(order[:cut]), sorted(order[cut:])]


def max_context(model: nn.Module) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def checked_pair(tokenizer: Any, prompt: str, answer: str, context_limit: int | None, label: str
                 ) -> tuple[list[int], list[int]]:
    """Prompt and answer token ids; ValueError naming `label` when either is empty or they outgrow the context."""
    return checked_ids(list(tokenizer(prompt)["input_ids"]), encode_answer(tokenizer, answer), answer, context_limit,
                       label)


def checked_ids(prompt_ids: list[int], answer_ids: list[int], answer: str, context_limit: int | None, label: str
                ) -> tuple[list[int], list[int]]:
    """`checked_pair` for ids already made (a chat turn and its reply)."""
    if not prompt_ids:
        raise ValueError(f"{label}: the prompt tokenises to nothing")
    if not answer_ids:
        raise ValueError(f"{label}: the target {answer!r} tokenises to nothing")
    if context_limit is not None and len(prompt_ids) + len(answer_ids) > context_limit:
        raise ValueError(
            f"{label}: prompt + target is {len(prompt_ids) + len(answer_ids)} tokens, "
            f"longer than the model's context of {context_limit}"
        )
    return prompt_ids, answer_ids


def chat_prompt_ids(tokenizer: Any, question: str) -> list[int] | None:
    """`question` as a user message through the tokenizer's chat template, with the generation prompt (what a
    chat client sends); None when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return chat_template_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def chat_reply_ids(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]] | None:
    """The chat prompt of `question` and the assistant's reply `answer` as the template writes it: the answer
    without a leading space, then the template's end of turn (so that an expert trained on it stops after
    the answer). None without a template, or when the template writes the reply so that the prompt is not a
    prefix of the whole conversation, or refuses an assistant turn (the caller falls back to prompt + " " + answer)."""
    prompt = chat_prompt_ids(tokenizer, question)
    if prompt is None:
        return None
    try:
        whole = chat_template_ids(tokenizer, [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer.strip()}],
                                  add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses an assistant turn (jinja raises its own errors)
        return None
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        return None
    reply = whole[len(prompt):]
    while len(reply) > 1 and not tokenizer.decode(reply[-1:]).strip():  # the newline after the end of turn
        reply.pop()
    return prompt, reply


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """The tokens that end a chat reply: the tokenizer's end of sequence and, where the template closes an
    assistant turn with a special token of its own (Gemma's <end_of_turn>), that token."""
    ends = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    reply = chat_reply_ids(tokenizer, "?", "a")
    if reply is not None and reply[1][-1] in set(tokenizer.all_special_ids):
        ends.add(int(reply[1][-1]))
    return frozenset(ends)


def chat_template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # releases that return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    context_limit: int | None = None,
    labels: Sequence[str] | None = None,
    continuations: Sequence[Sequence[int]] | None = None,
) -> TeacherForcedBatch:
    """Build a batch; a pair that is empty or too long for the model raises ValueError naming it.

    `continuations` (token ids per pair) are appended after the answers as further targets, marked in
    `follows`; they are cut to the model's context rather than refused."""
    pairs = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        label = labels[i] if labels else f"pair {i} (prompt {prompt[:60]!r})"
        pairs.append(checked_pair(tokenizer, prompt, answer, context_limit, label))
    return encode_id_pairs(pairs, pad_id(tokenizer), context_limit, continuations)


def encode_id_pairs(
    pairs: Sequence[tuple[list[int], list[int]]],
    pad: int,
    context_limit: int | None = None,
    continuations: Sequence[Sequence[int]] | None = None,
) -> TeacherForcedBatch:
    """A batch from (prompt ids, answer ids) pairs already checked (`checked_pair`); see `encode_pairs`."""
    sequences: list[list[int]] = []
    prompt_lengths: list[int] = []
    answer_ends: list[int] = []
    for i, (prompt_ids, answer_ids) in enumerate(pairs):
        following = list(continuations[i]) if continuations is not None else []
        if context_limit is not None:
            following = following[: max(0, context_limit - len(prompt_ids) - len(answer_ids))]
        sequences.append(prompt_ids + answer_ids + following)
        prompt_lengths.append(len(prompt_ids))
        answer_ends.append(len(prompt_ids) + len(answer_ids))
    length = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    prompt_mask = torch.zeros(batch, length, dtype=torch.long)
    rows, positions, targets, follows = [], [], [], []
    for row, (seq, plen, end) in enumerate(zip(sequences, prompt_lengths, answer_ends)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        prompt_mask[row, :plen] = 1
        for pos in range(plen, len(seq)):
            rows.append(row)
            positions.append(pos - 1)
            targets.append(seq[pos])
            follows.append(pos >= end)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return TeacherForcedBatch(input_ids, attention_mask, prompt_mask, as_long(rows), as_long(positions),
                              as_long(targets), torch.tensor(follows, dtype=torch.bool) if continuations else None)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; a prompt that tokenises to nothing is refused by its index."""
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    for i, seq in enumerate(encoded):
        if not seq:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to nothing")
    return encoded


def pad_sequences(sequences: Sequence[Sequence[int]], pad: int, left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a padded batch: (B, T) ids and attention mask. Left padding for generation."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left_pad else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def encode_prompts(tokenizer: Any, prompts: Sequence[str], left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts alone as a padded batch: (B, T) ids and attention mask. Left padding for generation."""
    return pad_sequences(tokenize_prompts(tokenizer, prompts), pad_id(tokenizer), left_pad)


def answer_logits(model: nn.Module, batch: TeacherForcedBatch) -> torch.Tensor:
    """(N, V) logits at the answer positions only: the LM head never sees the other positions."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    states = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state  # (B, T, d)
    picked = states[batch.rows, batch.positions]  # (N, d)
    head = model.get_output_embeddings()
    logits = head(picked.to(head.weight.dtype)).float()  # (N, V)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def per_row_accuracy(correct: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fraction of each row's answer tokens that are correct: (N,) bool -> (B,) float."""
    totals = torch.zeros(batch_size).index_add_(0, rows.cpu(), torch.ones(rows.numel()))
    hits = torch.zeros(batch_size).index_add_(0, rows.cpu(), correct.float().cpu())
    return hits / totals.clamp(min=1)


def prompt_batch(tokenizer: Any, prompts: Sequence[str]) -> TeacherForcedBatch:
    """Prompts alone (right-padded, no answers): for capture passes that pool or route on them."""
    return prompt_inputs(*encode_prompts(tokenizer, prompts, left_pad=False))


def prompt_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherForcedBatch:
    """Token ids and mask of whole prompts (either padding side) as a batch without answers."""
    empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    return TeacherForcedBatch(input_ids, attention_mask, attention_mask, empty, empty, empty)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token counted over real tokens only, so that left and right padding
    give a token the same position (absolute-position models such as GPT-2 depend on it)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
