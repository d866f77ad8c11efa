"""Training rows that begin with the same tokens, with that beginning computed once.

Chat rows all start with the template's system prompt and user header (24 of SmolLM2's ~47 tokens
per chat row). While a new expert trains, every step runs layers L..N over every token of every row;
the shared beginning gives the same states in each row, so it is run once, as one row through the
model with a KV cache, the cache is repeated for every row, and each row's remainder runs on it.
Gradients flow through the repeated cache, so the result is the full computation's, up to float
rounding.

This is the one module where training touches a transformers KV cache, and it uses public API only:
`DynamicCache(config=...)`, `get_seq_length`, `batch_repeat_interleave`, and the cache keyword that the
base model's `forward` declares (`past_key_values` before transformers 5.24, `cache` after). Because a
release could still change how a cache meets a model whose lower layers are replayed, the first two
shared runs on each model are checked against the full computation (logits at the first step, with
the new expert still zero; logits and gradients at the second, with it trained); if they differ,
sharing is switched off for that model with a warning, and training goes on unshared.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .encoding import TeacherForcedBatch, answer_logits, head_logits, last_states

logger = logging.getLogger("lemoe")

MIN_SHARED_TOKENS = 8  # below this the extra pass costs more than it saves
MIN_ROWS = 2

# per model: absent = not checked, "logits" = logits checked with a zero expert (the first step), True = logits
# and gradients checked with a trained one as well (the second step), False = differs or failed: sharing off
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, bool | str]" = weakref.WeakKeyDictionary()


def shared_prefix_length(batch: TeacherForcedBatch) -> int:
    """How many leading tokens every row shares, cut so that no answer is predicted from inside them
    (the logit that predicts an answer token must come from the part each row runs on its own)."""
    if batch.size < MIN_ROWS or batch.positions.numel() == 0:
        return 0
    lengths = batch.attention_mask.sum(dim=1)  # (B,)
    width = int(lengths.min())
    ids = batch.input_ids[:, :width]  # (B, width)
    same = (ids == ids[:1]).all(dim=0)  # (width,)
    shared = int(same.long().cumprod(dim=0).sum())
    return min(shared, int(batch.positions.min()))


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword under which the base model's forward takes a KV cache, or None when it declares neither."""
    parameters = inspect.signature(model.base_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def answer_logits_sharing_prefix(model: nn.Module, batch: TeacherForcedBatch, layer_input: torch.Tensor,
                                 replay: Callable[[torch.Tensor | None], None],
                                 params: list[nn.Parameter] | None = None) -> torch.Tensor:
    """(N, V) answer logits of `batch`, its shared beginning run once; the full computation where that does
    not apply (too short, too few rows, a model without a cache keyword, or a model where a check failed).
    `replay` sets what the replayed layers below L return (None: run the real layers). `params` (what is
    being trained) lets the second step's check compare gradients too."""
    shared = shared_prefix_length(batch)
    keyword = cache_keyword(model)
    state = _VERIFIED.get(model)
    if shared < MIN_SHARED_TOKENS or keyword is None or state is False:
        replay(layer_input)
        return answer_logits(model, batch)
    if state is True:
        return _shared_logits(model, batch, layer_input, replay, shared, keyword)
    try:  # the first two shared runs on this model are checked against the full computation
        logits = _shared_logits(model, batch, layer_input, replay, shared, keyword)
        same = _same_as_full(model, batch, layer_input, replay, logits, params if state == "logits" else None)
        _VERIFIED[model] = ("logits" if state is None else True) if same else False
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # not a sign of a changed cache: the caller's edit fails and is rolled back, sharing stays unchecked
    except Exception as error:  # noqa: BLE001 - whatever a release changed, training must go on unshared
        _VERIFIED[model] = False
        logger.warning("training with a shared prompt beginning failed on this model (transformers %s: %s); "
                       "training runs every token from now on", _transformers_version(), error)
    if _VERIFIED[model] is False:
        replay(layer_input)
        return answer_logits(model, batch)
    return logits


def _shared_logits(model: nn.Module, batch: TeacherForcedBatch, layer_input: torch.Tensor,
                   replay: Callable[[torch.Tensor | None], None], shared: int, keyword: str) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    replay(None)  # the beginning runs through the real lower layers, so their cache layers hold it too
    head = batch.input_ids[:1, :shared]  # (1, S)
    model.base_model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True, **{keyword: cache})
    if cache.get_seq_length() != shared:
        raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after a {shared}-token pass")
    cache.batch_repeat_interleave(batch.size)
    replay(layer_input[:, shared:])  # (B, T - S, d): the rest of each row, lower layers replayed
    output = model.base_model(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask,
                              use_cache=True, **{keyword: cache})
    states = last_states(output)  # (B, T - S, d)
    return head_logits(model, states[batch.rows, batch.positions - shared])


def _same_as_full(model: nn.Module, batch: TeacherForcedBatch, layer_input: torch.Tensor,
                  replay: Callable[[torch.Tensor | None], None], shared_logits: torch.Tensor,
                  params: list[nn.Parameter] | None) -> bool:
    """Whether the shared run gives the full computation's logits (and, given `params`, gradients) on this
    model, within what the logits' dtype can hold."""
    replay(layer_input)
    full = answer_logits(model, batch)
    scale = float(full.detach().abs().max()) if full.numel() else 0.0
    eps = torch.finfo(layer_input.dtype).eps if layer_input.dtype.is_floating_point else 0.0
    tolerance = max(1e-3, 64 * eps * scale)  # float32: 1e-3; bfloat16 / float16: a few per cent of the largest
    problems = []
    difference = float((full.detach() - shared_logits.detach()).abs().max()) if full.numel() else 0.0
    if difference > tolerance:
        problems.append(f"logits differ by {difference:.3g}")
    trainable = [p for p in params or [] if p.requires_grad]
    if trainable and not problems:
        weights = torch.linspace(-1, 1, full.numel(), device=full.device).reshape(full.shape)  # any fixed mix
        grads_full = torch.autograd.grad((full * weights).sum(), trainable, allow_unused=True)
        grads_shared = torch.autograd.grad((shared_logits * weights).sum(), trainable, allow_unused=True,
                                           retain_graph=True)
        for a, b in zip(grads_full, grads_shared):
            if (a is None) != (b is None):
                problems.append("gradients reach the trained weights on one path only")
            elif a is not None:
                gap = float((a - b).abs().max())
                if gap > max(1e-3, 64 * eps * float(a.abs().max())):
                    problems.append(f"gradients differ by {gap:.3g}")
    if problems:
        logger.warning("training with a shared prompt beginning differs from the full computation on this model "
                       "(transformers %s: %s); training runs every token from now on", _transformers_version(),
                       "; ".join(problems))
        return False
    return True


def _transformers_version() -> Any:
    import transformers

    return transformers.__version__
