"""Routing once per sequence: which decision a routed FFN uses in each forward call of a model.

This is the one module that depends on how transformers calls a model, and it reads nothing
private (no keyword is looked up by a name that a release may rename):

- `generate` is wrapped on the model *instance* (as PEFT does for its adapters): at its entry the
  whole prompt (`inputs` / `input_ids` and `attention_mask`, public arguments of `generate`) is
  decided once, by a capture pass that stops at the route layer. Every forward inside that
  `generate` reuses the decision, its rows repeated the way `generate` expands prompts for beams and
  `num_return_sequences`. That one rule holds for greedy, sampling, beam search, assisted decoding,
  chunked prefill (`prefill_chunk_size`) and `use_cache=False`: none of them can split the prompt.
- Outside `generate`, a pre-hook on the model records what each call carries: the padding mask
  (`attention_mask`, bound through the forward's signature) and the KV cache, found *by type*
  (a `transformers.Cache` among the arguments, whatever its keyword is called: `past_key_values`
  before transformers 5.24, `cache` after), with its length at entry. A call that continues a cache
  which already carries a decision (a decode step with a cache held by the caller) reuses it; any
  other call decides afresh on its own non-padding tokens, and its decision is stored on the cache
  (the one passed in, or the one the model returns) for the calls that continue it.
- A call without a cache and outside `generate` (lm-eval-harness style: context + continuation in
  one call) is decided on every token it carries: the model cannot know where a prompt ends unless
  told, which is what the routed modules' `prompt_positions` context is for.

Decisions are whatever the routed module returns (LEMoE: a `Route`); rows are selected from any
tensor, dataclass or tuple of tensors whose first dimension is the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

logger = logging.getLogger("lemoe")

_CACHE_ATTRIBUTE = "_lemoe_decisions"  # on a KV cache object: {routing key: decision}


@dataclass
class CallInfo:
    """What one forward call of the model carries, as the model-level pre-hook saw it."""

    mask: torch.Tensor | None  # (B, T_total) padding mask, when the caller gave one
    cache: Any | None  # the KV cache passed in, found by type
    past_length: int  # tokens that cache held when the call began
    previous: "CallInfo | None" = None  # the enclosing call (nested calls of one model)
    decision: Any = None  # set by the routed module; stored on the returned cache after the call


@dataclass
class GenerateScope:
    """The decision of a `generate` call's prompt, one row per prompt given to `generate`."""

    decision: Any
    rows: int


@dataclass
class Reuse:
    """A decision taken earlier in this sequence; `continuing` is True for calls after the prompt."""

    decision: Any
    continuing: bool


def find_cache(values: Iterable[Any]) -> Any | None:
    """The first KV cache among `values`, recognised by type (transformers' public `Cache` base class)."""
    from transformers import Cache

    for value in values:
        if isinstance(value, Cache):
            return value
    return None


def cache_length(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:  # an exotic cache without a usable length: treat it as empty (decide afresh)
        return 0


def decision_rows(decision: Any) -> int | None:
    """The batch size of a decision: the first dimension of its first tensor."""
    if isinstance(decision, torch.Tensor):
        return int(decision.shape[0]) if decision.dim() else None
    if dataclasses.is_dataclass(decision) and not isinstance(decision, type):
        values: Iterable[Any] = (getattr(decision, f.name) for f in dataclasses.fields(decision))
    elif isinstance(decision, (tuple, list)):
        values = decision
    else:
        return None
    for value in values:
        rows = decision_rows(value)
        if rows is not None:
            return rows
    return None


def select_rows(decision: Any, index: torch.Tensor) -> Any:
    """The decision of rows `index` (every batch-first tensor inside it indexed alike)."""
    if isinstance(decision, torch.Tensor):
        return decision.index_select(0, index.to(decision.device)) if decision.dim() else decision
    if dataclasses.is_dataclass(decision) and not isinstance(decision, type):
        changes = {f.name: select_rows(getattr(decision, f.name), index) for f in dataclasses.fields(decision)}
        return dataclasses.replace(decision, **changes)
    if isinstance(decision, (tuple, list)):
        return type(decision)(select_rows(value, index) for value in decision)
    return decision


def expand_to(decision: Any, rows: int, batch: int) -> Any | None:
    """A `rows`-row decision for a `batch`-row call: each row repeated batch / rows times in place
    (how `generate` expands prompts for beams and return sequences), or None if it does not divide."""
    if batch == rows:
        return decision
    if rows == 0 or batch % rows:
        return None
    index = torch.arange(rows).repeat_interleave(batch // rows)
    return select_rows(decision, index)


def generate_prompt(model: nn.Module, signature: inspect.Signature, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, T) prompt ids and padding mask of a `generate` call; the mask is inferred as `generate`
    documents it (padding = the pad token, unless it is also the end-of-sequence token) when absent."""
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    ids = bound.get("inputs")
    if ids is None:
        ids = bound.get("input_ids", extra.get("input_ids"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        return None, None
    mask = bound.get("attention_mask", extra.get("attention_mask"))
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return ids, mask
    config = bound.get("generation_config") or getattr(model, "generation_config", None)
    pad = extra.get("pad_token_id", getattr(config, "pad_token_id", None))
    eos = extra.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    if pad is not None and pad not in eos_ids and bool((ids == pad).any()):
        return ids, (ids != pad).long()
    return ids, torch.ones_like(ids)


class SequenceRouting:
    """Tells one routed module, in every forward call of `model`, whether a decision for the
    sequence already exists, and keeps the decisions it takes for the calls that continue them.

    `decide_prompts(input_ids, attention_mask)` returns the module's decision for whole prompts
    (one row each), or None when there is nothing to decide (no experts): used at `generate` entry.
    """

    def __init__(self, model: nn.Module, decide_prompts: Callable[[torch.Tensor, torch.Tensor], Any],
                 lock: ContextManager[Any] | None = None) -> None:
        self.model = model
        self.decide_prompts = decide_prompts
        self.lock = lock if lock is not None else contextlib.nullcontext()  # held by `generate` from start to end
        self.key = f"{id(self):x}"
        self._call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(f"lemoe_call_{self.key}",
                                                                                     default=None)
        self._scope: contextvars.ContextVar[GenerateScope | None] = contextvars.ContextVar(
            f"lemoe_generate_{self.key}", default=None)
        self._forward_signature = _signature(model.forward)
        self.active = True
        self._hooks = [
            model.register_forward_pre_hook(self._before_call, with_kwargs=True),
            model.register_forward_hook(self._after_call, always_call=True),
        ]
        self._generate_wrapper = self._wrap_generate()

    # ------------------------------------------------------------------ what the routed module asks

    def reusable(self, batch: int) -> Reuse | None:
        """The decision this call must reuse (a `generate` in progress, or a cache that carries one)."""
        call = self._call.get()
        continuing = call is not None and call.past_length > 0
        scope = self._scope.get()
        if scope is not None and scope.decision is not None:
            decision = expand_to(scope.decision, scope.rows, batch)
            if decision is not None:
                return Reuse(decision, continuing)
            logger.debug("generate call of %d rows cannot reuse a %d-row prompt decision", batch, scope.rows)
        if call is not None and call.cache is not None and continuing:
            decision = getattr(call.cache, _CACHE_ATTRIBUTE, {}).get(self.key)
            if decision is not None and decision_rows(decision) == batch:
                return Reuse(decision, True)
        return None

    def call_mask(self, batch: int, length: int) -> torch.Tensor | None:
        """(B, length) padding mask of this call's tokens, when the caller gave one that fits."""
        call = self._call.get()
        mask = call.mask if call is not None else None
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        return mask[:, -length:]

    def remember(self, decision: Any) -> None:
        """Keep a fresh decision for the calls that continue this call's cache."""
        call = self._call.get()
        if call is None:
            return
        call.decision = decision
        if call.cache is not None:
            self._store(call.cache, decision)

    # ------------------------------------------------------------------ hooks

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = _bound_argument(self._forward_signature, args, kwargs, "attention_mask")
        cache = find_cache((*args, *kwargs.values()))
        info = CallInfo(
            mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            cache=cache,
            past_length=cache_length(cache) if cache is not None else 0,
            previous=self._call.get(),
        )
        self._call.set(info)

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = self._call.get()
        if call is None:
            return
        self._call.set(call.previous)
        if call.decision is not None and call.cache is None:
            returned = find_cache(_output_values(output))
            if returned is not None:
                self._store(returned, call.decision)

    def _store(self, cache: Any, decision: Any) -> None:
        try:
            decisions = cache.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
        except AttributeError:  # a cache without a __dict__: decode steps will decide afresh
            logger.debug("cannot store a routing decision on a %s", type(cache).__name__)
            return
        decisions[self.key] = decision

    # ------------------------------------------------------------------ generate

    def _wrap_generate(self) -> Callable[..., Any] | None:
        model = self.model
        original = getattr(model, "generate", None)
        if original is None:
            return None
        signature = _signature(original)
        routing = self

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if not routing.active:
                return original(*args, **kwargs)
            ids, mask = generate_prompt(model, signature, args, kwargs)
            if ids is None:  # inputs_embeds only: each call decides, caches carry the decision
                return original(*args, **kwargs)
            with routing.lock:  # the experts cannot change between the decision and the last token
                decision = routing.decide_prompts(ids, mask)
                token = routing._scope.set(GenerateScope(decision, int(ids.shape[0])))
                try:
                    return original(*args, **kwargs)
                finally:
                    routing._scope.reset(token)

        generate.__dict__["_lemoe_previous"] = model.__dict__.get("generate")
        model.generate = generate  # an instance attribute: the class's generate is untouched
        return generate

    def remove(self) -> None:
        """Remove the hooks and the `generate` wrapper (a wrapper someone else wrapped turns inert)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.active = False
        wrapper = self._generate_wrapper
        if wrapper is not None and self.model.__dict__.get("generate") is wrapper:
            previous = wrapper.__dict__.get("_lemoe_previous")
            if previous is None:
                del self.model.generate
            else:
                self.model.generate = previous
        self._generate_wrapper = None


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _bound_argument(signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    if signature is None or not args:
        return None
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get(name)
    except TypeError:
        return None


def _output_values(output: Any) -> Iterable[Any]:
    if isinstance(output, dict):  # ModelOutput is an ordered dict of the fields that are set
        return output.values()
    if isinstance(output, (tuple, list)):
        return output
    return ()
