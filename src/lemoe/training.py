"""Train one new expert on one edit batch, running only layers L..N.

The layers below L are frozen and do not depend on the adaptor, so their output is computed
once per batch and replayed: during training, layers 0..L-1 are swapped for a module that
returns the cached layer-L input. Logits are computed at answer positions only.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig
from .encoding import TeacherForcedBatch, answer_logits, length_groups, mask_positions, per_row_accuracy
from .layer import LEMoELayer


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    token_accuracy: list[float]  # per edit, teacher-forced, with the new expert forced on


# Whether a model's decoder layers return a tuple (hidden, ...) rather than the hidden states alone
# (GPT-2 did until transformers 5.x moved to plain tensors): seen in the capture pass, honoured by the replay.
_RETURNS_TUPLE: "weakref.WeakKeyDictionary[nn.ModuleList, bool]" = weakref.WeakKeyDictionary()


class _Replay(nn.Module):
    """Stands in for a frozen decoder layer below L: returns the cached input of layer L, in the
    shape the real layer returns its output."""

    def __init__(self, original: nn.Module, cached: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its attributes only
        self.cached = cached
        self.as_tuple = as_tuple
        object.__setattr__(self, "mine", _this_thread())  # other threads run the original layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model reads off its layers (e.g. `attention_type`)
            return getattr(object.__getattribute__(self, "original"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not object.__getattribute__(self, "mine")():
            return object.__getattribute__(self, "original")(hidden_states, *args, **kwargs)
        return (self.cached,) if self.as_tuple else self.cached


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, layer_idx: int, adaptor: nn.Module, ffns: dict[int, nn.Module],
    batch: TeacherForcedBatch,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One frozen forward pass up to layer L's FFN: the input of decoder layer L (B, T, d), replayed
    while training, and the input (B, T, d) of each FFN in `ffns` (those routing reads), by the same key."""
    captured: dict[str, torch.Tensor] = {}
    grabbed: dict[int, torch.Tensor] = {}
    mine = _this_thread()

    def grab_layer_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if mine():
            captured["layer"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        if mine():
            raise _StopForward

    def note_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        _RETURNS_TUPLE[layers] = isinstance(output, tuple)

    handles = [
        layers[0].register_forward_hook(note_output),
        layers[layer_idx].register_forward_pre_hook(grab_layer_input, with_kwargs=True),
        *_grabbers(ffns, grabbed),
        adaptor.register_forward_pre_hook(stop),  # after the route grabs: a route layer may be this one
    ]
    _run_until_stop(model, batch, handles)
    return captured["layer"], grabbed


@torch.no_grad()
def capture_route_inputs(model: nn.Module, route_ffn: nn.Module, batch: TeacherForcedBatch) -> torch.Tensor:
    """The FFN input of the route layer (B, T, d), from a frozen pass that stops right there."""
    return capture_ffn_inputs(model, {0: route_ffn}, batch)[0]


@torch.no_grad()
def capture_ffn_inputs(model: nn.Module, ffns: dict[int, nn.Module], batch: TeacherForcedBatch
                       ) -> dict[int, torch.Tensor]:
    """The FFN inputs (B, T, d) of several layers (by layer index), from a frozen pass that stops at the
    highest of them."""
    grabbed: dict[int, torch.Tensor] = {}
    top = max(ffns)
    mine = _this_thread()

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        if mine():
            raise _StopForward

    handles = [*_grabbers(ffns, grabbed), ffns[top].register_forward_pre_hook(stop)]  # stop after the grabs
    _run_until_stop(model, batch, handles)
    return grabbed


def _this_thread() -> Any:
    """A test for "this call runs in the thread that installed the hook": other threads (generation
    served beside an edit) pass through every capture hook and replayed layer untouched."""
    owner = threading.get_ident()
    return lambda: threading.get_ident() == owner


def _grabbers(ffns: dict[int, nn.Module], grabbed: dict[int, torch.Tensor]) -> list[Any]:
    """Pre-hooks that keep each FFN's input under its layer index (one module may serve two indices)."""
    handles = []
    mine = _this_thread()
    for index, ffn in ffns.items():
        def grab(module: nn.Module, args: tuple[Any, ...], index: int = index) -> None:
            if mine():
                grabbed[index] = args[0].detach()
        handles.append(ffn.register_forward_pre_hook(grab))
    return handles


def _run_until_stop(model: nn.Module, batch: TeacherForcedBatch, handles: list[Any]) -> None:
    try:
        model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=mask_positions(batch.attention_mask), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Ends the capture pass at layer L's FFN: nothing above it is needed."""


@contextmanager
def replay_below(layers: nn.ModuleList, layer_idx: int, cached: torch.Tensor
                 ) -> Iterator[Callable[[torch.Tensor], None]]:
    """Layers below L replay `cached`; the context gives a function that swaps in another cached input
    (the next part of a batch run in parts)."""
    originals = [layers[i] for i in range(layer_idx)]
    as_tuple = _RETURNS_TUPLE.get(layers, False)
    replays = [_Replay(originals[i], cached, as_tuple) for i in range(layer_idx)]
    for i, replay in enumerate(replays):
        layers[i] = replay

    def use(part_input: torch.Tensor) -> None:
        for replay in replays:
            replay.cached = part_input

    try:
        yield use
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


def train_expert(
    model: nn.Module,
    layers: nn.ModuleList,
    layer_idx: int,
    adaptor: LEMoELayer,
    expert_id: int,
    batch: TeacherForcedBatch,
    layer_input: torch.Tensor,
    config: LEMoEConfig,
) -> TrainResult:
    """Minimise the NLL of the answer tokens with only `adaptor.experts[expert_id]` trainable."""
    forced = torch.tensor([expert_id], dtype=torch.long)  # every row, whatever part of the batch runs
    settings = OptimiseSettings(config.lr, config.max_steps, config.min_steps, config.early_stop, config.weight_decay,
                                split_by_length=True, confidence=config.stop_confidence,
                                autocast=torch.bfloat16 if config.train_precision == "bfloat16" else None)
    return optimise(model, layers, layer_idx, batch, layer_input, list(adaptor.experts[expert_id].parameters()),
                    settings, adaptor.forced_route(forced))


@dataclass
class OptimiseSettings:
    lr: float
    max_steps: int
    min_steps: int = 0
    early_stop: bool = True
    weight_decay: float = 0.0
    split_by_length: bool = False  # run short and long rows as two parts (see encoding.length_groups); only
    #                                for a `context` that does not depend on the row order (one forced expert)
    autocast: torch.dtype | None = None  # run the forward passes under autocast to this dtype until the
    #                                      stop, which one full-precision pass then confirms
    confidence: float = 0.0  # an answer token counts as learnt (for the stop) once it is the argmax with at
    #                          least this probability; 0: once it is the argmax


def optimise(
    model: nn.Module,
    layers: nn.ModuleList,
    layer_idx: int,
    batch: TeacherForcedBatch,
    layer_input: torch.Tensor,
    params: list[nn.Parameter],
    settings: OptimiseSettings,
    context: ContextManager[Any] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """AdamW on `params` against the answer tokens' NLL (+ `extra_loss()`), layers L..N only.

    Where the batch has tokens after the answers (`batch.follows`), those are held to the model's
    own distribution at the first step (KL), which is the unedited model's when `params` start as a
    zero function (a new expert does). Stops early once every answer token is the argmax (after
    `min_steps`; with `settings.confidence`, the argmax with at least that probability, and where that
    bar is not met by `max_steps` and the argmax was lost on the way, the parameters of the last pass
    that had it are put back, so the bar never leaves an edit worse than the argmax stop). `after_step`
    runs after each update (a projection or a gradient mask, for methods that need one). With
    `settings.autocast`, the passes run in that dtype until they would stop; then the same parameters
    are scored again at full precision, which decides: stop, or go on at full precision, so the stop
    and the reported accuracy are always full precision's.
    """
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps, loss_value = 0, float("nan")
    correct = torch.zeros(0, dtype=torch.bool)
    parts, order = _parts(batch, layer_input, settings.split_by_length)
    targets, rows = batch.targets[order], batch.rows[order]  # (N,) in the order the parts give their logits
    follows = batch.follows[order] if batch.follows is not None and bool(batch.follows.any()) else None
    # (N,) True on the answers' own tokens, which decide the stop and the accuracy (not on what follows them)
    answer = ~follows if follows is not None else torch.ones_like(targets, dtype=torch.bool)
    reference: torch.Tensor | None = None  # log-probs after the answer at step 0
    settled: list[torch.Tensor] | None = None  # with a confidence bar: the parameters when every answer
    #                                            token was last the argmax, kept in case the bar is never met
    restored = False
    try:
        with _eval_mode(model), replay_below(layers, layer_idx, layer_input) as replay, (context or nullcontext()):
            precision = settings.autocast
            while True:
                with lowered_precision(layer_input.device, precision):
                    logits = _answer_logits(model, parts, replay)  # (N, V)
                targets, answer = targets.to(logits.device), answer.to(logits.device)
                if follows is None:
                    loss = F.cross_entropy(logits, targets)
                else:  # the answer's NLL, and on what follows it, KL to the model before this optimisation
                    if reference is None:
                        reference = torch.log_softmax(logits[follows], dim=-1).detach()  # (M, V)
                    loss = F.cross_entropy(logits[~follows], targets[~follows]) + F.kl_div(
                        torch.log_softmax(logits[follows], dim=-1), reference, log_target=True, reduction="batchmean")
                if extra_loss is not None:
                    loss = loss + extra_loss()
                correct = logits.argmax(dim=-1) == targets  # (N,)
                loss_value = float(loss.detach())
                learnt = correct if settings.confidence <= 0 else correct & (  # (N,)
                    torch.log_softmax(logits.detach(), dim=-1).gather(1, targets[:, None])[:, 0]
                    >= math.log(settings.confidence))
                answered, argmax_all = bool(learnt[answer].all()), bool(correct[answer].all())
                if settings.confidence > 0 and argmax_all and not restored:
                    settled = [param.detach().clone() for param in params]
                done = settings.early_stop and answered and steps >= settings.min_steps
                if done or steps >= settings.max_steps:
                    if precision is None:
                        if argmax_all or settled is None or restored:
                            break
                        with torch.no_grad():  # the bar was never met and the argmax was lost: go back
                            for param, kept in zip(params, settled):
                                param.copy_(kept)
                        restored = True  # score them once more at full precision, then stop
                        continue
                    precision = None  # the same parameters once more at full precision: it decides
                    continue
                grads = torch.autograd.grad(loss, params, allow_unused=True)  # an unchosen expert gets None
                for param, grad in zip(params, grads):
                    param.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                steps += 1
    finally:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
    answer = answer.to(correct.device)
    accuracy = per_row_accuracy(correct[answer], rows[answer.to(rows.device)], batch.size).tolist()
    return TrainResult(steps=steps, final_loss=loss_value, token_accuracy=accuracy)


def lowered_precision(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    """Autocast to `dtype` on `device`'s kind (no-op for None): matrix products of the frozen layers run in
    it, parameters keep their dtype."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _parts(batch: TeacherForcedBatch, layer_input: torch.Tensor, split: bool
           ) -> tuple[list[tuple[TeacherForcedBatch, torch.Tensor]], torch.Tensor]:
    """The batch as parts run one after another (with their cached layer-L inputs), and the (N,) answer-
    token order their logits come in: one part, or two by length when that saves padded tokens."""
    groups = length_groups(batch.attention_mask.sum(dim=1).tolist()) if split else [list(range(batch.size))]
    if len(groups) == 1:
        return [(batch, layer_input)], torch.arange(batch.targets.numel(), device=batch.targets.device)
    parts, orders = [], []
    for rows in groups:
        part, tokens = batch.select(rows)
        index = torch.tensor(rows, device=layer_input.device)
        parts.append((part, layer_input[index, : part.input_ids.shape[1]]))  # (b, t, d)
        orders.append(tokens)
    return parts, torch.cat(orders)


def _answer_logits(model: nn.Module, parts: list[tuple[TeacherForcedBatch, torch.Tensor]],
                   replay: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """(N, V) answer logits of every part, each run on its own cached layer-L input."""
    if len(parts) == 1:
        return answer_logits(model, parts[0][0])
    logits = []
    for part, part_input in parts:
        replay(part_input)
        logits.append(answer_logits(model, part))
    return torch.cat(logits)
