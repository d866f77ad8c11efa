"""Rel / Gen / Loc teacher-forced (EasyEdit / WISE definitions) and generative exact match.

- Reliability: on `prompt + " " + target`, the fraction of target tokens that are the argmax
  given everything before them; one number per edit.
- Generality: the same on the rephrased prompt.
- Locality: on `locality_prompt + " " + locality_answer`, the fraction of answer positions where
  the edited model's argmax equals the unedited model's argmax.
- Generative exact match: greedy decoding from the prompt must produce the target tokens verbatim.

Routing is decided on the prompt tokens only, as it is at generation time.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import answer_logits, encode_answer, encode_pairs, encode_prompts, max_context, pad_id
from .layer import LEMoELayer


def _routing_context(adaptor: LEMoELayer | None, mask: torch.Tensor) -> ContextManager[None]:
    return adaptor.prompt_positions(mask) if adaptor is not None else nullcontext()


@torch.no_grad()
def answer_predictions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    adaptor: LEMoELayer | None = None,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per pair, the argmax token at every answer position (teacher-forced)."""
    device = model.get_input_embeddings().weight.device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_pairs(tokenizer, prompts[start : start + batch_size], answers[start : start + batch_size],
                             max_context(model)).to(device)
        with _routing_context(adaptor, batch.prompt_mask):
            predicted = answer_logits(model, batch).argmax(dim=-1).cpu()  # (N,)
        rows = batch.rows.cpu()
        out.extend(predicted[rows == row] for row in range(batch.size))
    return out


def token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    adaptor: LEMoELayer | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Per pair, the fraction of answer tokens that are the argmax: Rel (or Gen on rephrases)."""
    predictions = answer_predictions(model, tokenizer, prompts, answers, adaptor, batch_size)
    return [float((pred == torch.tensor(encode_answer(tokenizer, ans))).float().mean())
            for pred, ans in zip(predictions, answers)]


@torch.no_grad()
def target_perplexity(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    adaptor: LEMoELayer | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Per pair, exp(mean NLL of the target tokens given the prompt): the hallucination-set measure."""
    device = model.get_input_embeddings().weight.device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_pairs(tokenizer, prompts[start : start + batch_size], targets[start : start + batch_size],
                             max_context(model)).to(device)
        with _routing_context(adaptor, batch.prompt_mask):
            nll = F.cross_entropy(answer_logits(model, batch), batch.targets, reduction="none").cpu()  # (N,)
        rows = batch.rows.cpu()
        totals = torch.zeros(batch.size).index_add_(0, rows, nll)
        counts = torch.zeros(batch.size).index_add_(0, rows, torch.ones_like(nll))
        out.extend(torch.exp(totals / counts).tolist())
    return out


def agreement(edited: Sequence[torch.Tensor], unedited: Sequence[torch.Tensor]) -> list[float]:
    """Locality per pair: share of positions where both models predict the same token."""
    return [float((a == b).float().mean()) for a, b in zip(edited, unedited, strict=True)]


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (left-padded batches, KV cache on)."""
    device = model.get_input_embeddings().weight.device
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk, left_pad=True)
        width = ids.shape[1]
        steps = max(lengths[start : start + batch_size])
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps, do_sample=False,
            pad_token_id=pad_id(tokenizer), eos_token_id=None,
        )
        for row in range(len(chunk)):
            results.append(generated[row, width : width + lengths[start + row]].tolist())
    return results


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
    "agreement",
    "answer_predictions",
    "generative_exact_match",
    "greedy_completions",
    "mean",
    "target_perplexity",
    "token_accuracy",
]
