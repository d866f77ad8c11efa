"""Rel / Gen / Loc teacher-forced (EasyEdit / WISE definitions) and generative exact match.

- Reliability: on `prompt + " " + target`, the fraction of target tokens that are the argmax
  given everything before them; one number per edit.
- Generality: the same on the rephrased prompt.
- Locality: on `locality_prompt + " " + locality_answer`, the fraction of answer positions where
  the edited model's argmax equals the unedited model's argmax.
- Generative exact match: greedy decoding from the prompt must produce the target tokens verbatim.

Routing is decided on the prompt tokens only, as it is at generation time: scoring functions take
the editor (anything with `prompt_positions(mask)`) and score inside that context.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import (answer_logits, encode_answer, encode_pairs, max_context, pad_id, pad_sequences,
                       tokenize_prompts)


class PromptRouter(Protocol):
    """An editor (or LEMoE layer) that can be told which positions of each row are its prompt."""

    def prompt_positions(self, mask: torch.Tensor) -> ContextManager[None]: ...


def _routing_context(router: PromptRouter | None, mask: torch.Tensor) -> ContextManager[None]:
    return router.prompt_positions(mask) if router is not None else nullcontext()


@dataclass
class AnswerScores:
    """Teacher-forced scores of (prompt, answer) pairs, per pair one entry per answer token."""

    predictions: list[torch.Tensor]  # the model's argmax token
    targets: list[torch.Tensor]  # the answer token
    nll: list[torch.Tensor]  # -log p(answer token)

    def accuracy(self) -> list[float]:
        """Per pair, the fraction of answer tokens that are the argmax: Rel (or Gen on rephrases)."""
        return [float((p == t).float().mean()) for p, t in zip(self.predictions, self.targets)]

    def perplexity(self) -> list[float]:
        """Per pair, exp(mean NLL of the answer tokens): the hallucination-set measure."""
        return [float(torch.exp(n.mean())) for n in self.nll]


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    router: PromptRouter | None = None,
    batch_size: int = 16,
) -> AnswerScores:
    """One batched teacher-forced pass over the pairs, logits at answer positions only."""
    device = model.get_input_embeddings().weight.device
    scores = AnswerScores([], [], [])
    for start in range(0, len(prompts), batch_size):
        batch = encode_pairs(tokenizer, prompts[start : start + batch_size], answers[start : start + batch_size],
                             max_context(model)).to(device)
        with _routing_context(router, batch.prompt_mask):
            logits = answer_logits(model, batch)  # (N, V)
        predicted = logits.argmax(dim=-1).cpu()
        nll = F.cross_entropy(logits, batch.targets, reduction="none").cpu()
        rows, targets = batch.rows.cpu(), batch.targets.cpu()
        for row in range(batch.size):
            here = rows == row
            scores.predictions.append(predicted[here])
            scores.targets.append(targets[here])
            scores.nll.append(nll[here])
    return scores


def answer_predictions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                       router: PromptRouter | None = None, batch_size: int = 16) -> list[torch.Tensor]:
    """Per pair, the argmax token at every answer position (teacher-forced): what Loc compares."""
    return score_answers(model, tokenizer, prompts, answers, router, batch_size).predictions


def token_accuracy(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                   router: PromptRouter | None = None, batch_size: int = 16) -> list[float]:
    """Per pair, the fraction of answer tokens that are the argmax: Rel (or Gen on rephrases)."""
    return score_answers(model, tokenizer, prompts, answers, router, batch_size).accuracy()


def target_perplexity(model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                      router: PromptRouter | None = None, batch_size: int = 16) -> list[float]:
    """Per pair, exp(mean NLL of the target tokens given the prompt)."""
    return score_answers(model, tokenizer, prompts, targets, router, batch_size).perplexity()


def agreement(edited: Sequence[torch.Tensor], unedited: Sequence[torch.Tensor]) -> list[float]:
    """Locality per pair: share of positions where both models predict the same token."""
    return [float((a == b).float().mean()) for a, b in zip(edited, unedited, strict=True)]


@torch.no_grad()
def greedy_from_ids(model: nn.Module, tokenizer: Any, sequences: Sequence[Sequence[int]], steps: Sequence[int],
                    batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of token-id prompts (left-padded batches, KV cache on), `steps[i]` tokens each.

    Batches are formed in order of (steps, length), so that a batch decodes about as many tokens as its
    rows want and pads little; the results come back in the callers' order."""
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(sequences)), key=lambda i: (steps[i], len(sequences[i])))
    results: list[list[int]] = [[] for _ in sequences]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_sequences([sequences[i] for i in rows], pad_id(tokenizer), left_pad=True)
        width, wanted = ids.shape[1], [steps[i] for i in rows]
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(wanted), do_sample=False,
            pad_token_id=pad_id(tokenizer), eos_token_id=None,
        )
        for row, i in enumerate(rows):
            results[i] = generated[row, width : width + wanted[row]].tolist()
    return results


def greedy_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (left-padded batches, KV cache on)."""
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    return greedy_from_ids(model, tokenizer, tokenize_prompts(tokenizer, prompts), lengths, batch_size)


def generative_exact_match(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16
) -> list[float]:
    """1.0 where greedy decoding from the prompt yields exactly the target's tokens, else 0.0."""
    target_ids = [encode_answer(tokenizer, t) for t in targets]
    completions = greedy_completions(model, tokenizer, prompts, [len(t) for t in target_ids], batch_size)
    return [float(c == t) for c, t in zip(completions, target_ids)]


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


__all__ = [
    "AnswerScores",
    "agreement",
    "answer_predictions",
    "generative_exact_match",
    "greedy_completions",
    "mean",
    "score_answers",
    "target_perplexity",
    "token_accuracy",
]
