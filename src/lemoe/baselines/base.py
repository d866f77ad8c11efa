"""What every baseline shares: its config base, a prompt-routed FFN wrapper, and the editor scaffolding.

A baseline editor has `LifelongEditor`'s interface (`edit`, `save`/`load`, `unload`, `route`,
`prompt_positions`, `routing_consistency`), so the harness in `lemoe.bench` runs it through the
same protocols and metrics. Each wraps the FFN of one decoder layer in a module that keeps the
original as `base_layer`; `unload` puts the original back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator, Sequence

import torch
from torch import nn

from .. import __version__
from ..data import EditRecord
from ..editor import EditReport, check_adapter_matches, checked_records, encode_edits
from ..encoding import TeacherForcedBatch, prompt_batch, prompt_inputs
from ..models import FFNLayout, base_model_identity, decoder_layers, find_layout, weight_fingerprint
from ..persistence import AdapterError, AdapterState, load_adapter, save_adapter
from ..sequence_routing import SequenceRouting
from ..training import OptimiseSettings, TrainResult, capture_layer_inputs, capture_route_inputs

logger = logging.getLogger("lemoe")


@dataclass
class MethodConfig:
    """Fields every baseline has: where it edits and how one batch is optimised."""

    layer: int | None = field(default=None, metadata={"help": "decoder layer edited; None = round(2/3 of the depth)"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate"})
    max_steps: int = field(default=40, metadata={"help": "upper bound on optimisation steps per batch"})
    min_steps: int = field(default=2, metadata={"help": "steps taken even if every target token is the argmax"})
    early_stop: bool = field(default=True, metadata={"help": "stop once every target token is the argmax"})
    seed: int = field(default=0, metadata={"help": "seed of random initialisations and masks"})

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer must be a non-negative int or None, got {self.layer!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if not isinstance(self.min_steps, int) or not 0 <= self.min_steps <= self.max_steps:
            raise ValueError(f"min_steps must be an int in [0, max_steps], got {self.min_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown %s keys: %s", cls.__name__, ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def resolve_layer(self, num_layers: int) -> int:
        layer = round(2 * num_layers / 3) if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {num_layers} decoder layers")
        return layer

    def optimise_settings(self) -> OptimiseSettings:
        return OptimiseSettings(self.lr, self.max_steps, self.min_steps, self.early_stop)


class PromptRoutedFFN(nn.Module):
    """An FFN wrapper that decides once per sequence, from its prompt, and keeps that decision while decoding.

    The decision is taken on the positions of the `prompt_positions` mask when scoring a prompt +
    answer, otherwise on the non-padding tokens of the call; later calls of the same sequence (decode
    steps, `generate`) reuse it through `lemoe.sequence_routing`, as LEMoE's own routing does.
    Subclasses say what a decision is (`decide`) and what it does to the output (`apply`).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._prompt_mask: torch.Tensor | None = None
        self._forced: Any = None
        self.sequence: SequenceRouting | None = None  # set by the editor

    @contextmanager
    def prompt_positions(self, mask: torch.Tensor) -> Iterator[None]:
        self._prompt_mask = mask
        try:
            yield
        finally:
            self._prompt_mask = None

    @contextmanager
    def forced(self, decision: Any) -> Iterator[None]:
        self._forced = decision
        try:
            yield
        finally:
            self._forced = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What both `decide` and `apply` read, computed once per call (the input itself by default)."""
        return x

    def decide(self, prepared: torch.Tensor, mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, prepared: torch.Tensor, decision: Any, mask: torch.Tensor,
              decoding: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, length = x.shape[:2]
        sequence = self.sequence if self._prompt_mask is None else None
        if self._prompt_mask is not None:
            mask = self._prompt_mask.to(x.device)
        else:
            call_mask = sequence.call_mask(batch, length) if sequence is not None else None
            mask = call_mask.to(x.device) if call_mask is not None else torch.ones(batch, length, device=x.device)
        prepared = self.prepare(x)
        if self._forced is not None:
            return self.apply(x, prepared, self._forced, mask, False)
        reuse = sequence.reusable(batch) if sequence is not None else None
        if reuse is not None:
            return self.apply(x, prepared, reuse.decision, mask, reuse.continuing)
        decision = self.decide(prepared, mask)
        if sequence is not None:
            sequence.remember(decision)
        return self.apply(x, prepared, decision, mask, False)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position where `mask` is 1 (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


class BaselineEditor:
    """Scaffolding of one baseline: wrap layer L's FFN, edit batch by batch, save / load / unload.

    Subclasses set `method` and `config_class` and implement `build` (the wrapper module),
    `train_batch` (one edit batch) and the tensor state (`state_tensors` / `restore_state`).
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    has_routing: ClassVar[bool] = False  # whether `route` names a per-edit slot that routing_consistency checks

    def __init__(self, model: nn.Module, tokenizer: Any, config: MethodConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.method} takes a {self.config_class.__name__}, got {type(self.config).__name__}")
        self.layout: FFNLayout = find_layout(model)
        self.layers = decoder_layers(model, self.layout)
        self.layer_idx = self.config.resolve_layer(len(self.layers))
        parent = self.layers[self.layer_idx]
        base_ffn = getattr(parent, self.layout.mlp_attr)
        if hasattr(base_ffn, "base_layer"):
            raise ValueError(f"decoder layer {self.layer_idx} already carries an editor; unload() it first")
        self.identity = base_model_identity(model)
        self.fingerprint = weight_fingerprint(base_ffn)
        self.module = self.build(base_ffn)
        setattr(parent, self.layout.mlp_attr, self.module)
        self.sequence_routing: SequenceRouting | None = None
        if isinstance(self.module, PromptRoutedFFN):
            self.sequence_routing = SequenceRouting(model, self._decide_generate_prompts)
            self.module.sequence = self.sequence_routing
        self.edits: list[dict[str, Any]] = []
        self.num_batches = 0
        self._attached = True

    # -- what a method defines
    def build(self, base_ffn: nn.Module) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, records: list[EditRecord], batch: TeacherForcedBatch, layer_input: torch.Tensor,
                    ffn_input: torch.Tensor) -> tuple[TrainResult, int | list[int]]:
        """Apply one batch; returns the training result and the slot (expert, entry) it went to, or one per edit."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def restore_state(self, tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
        raise NotImplementedError

    # -- the editor interface
    @property
    def num_experts(self) -> int:
        return self.num_batches

    @property
    def device(self) -> torch.device:
        return next(self.module.base_layer.parameters()).device

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def edit(self, records: Sequence[EditRecord]) -> EditReport:
        self._check_attached()
        records = checked_records(records)
        started = time.perf_counter()
        batch = encode_edits(self.tokenizer, self.model, records, len(self.edits)).to(self.input_device)
        layer_input, grabbed = capture_layer_inputs(self.model, self.layers, self.layer_idx, self.module,
                                                    {self.layer_idx: self.module}, batch)
        ffn_input = grabbed[self.layer_idx]
        result, slot = self.train_batch(records, batch, layer_input, ffn_input)
        slots = slot if isinstance(slot, list) else [slot] * len(records)
        for record, own in zip(records, slots):
            self.edits.append({**record.to_dict(probes=False), "batch": self.num_batches, "expert": own})
        self.num_batches += 1
        routed = self.route_states(ffn_input, batch.prompt_mask.to(ffn_input.device))  # prompts: causal
        report = EditReport(batch=self.num_batches - 1, expert=slots[0], num_edits=len(records), steps=result.steps,
                            seconds=time.perf_counter() - started, final_loss=result.final_loss,
                            train_accuracy=result.token_accuracy, routed_to_own=[r == s for r, s in zip(routed, slots)])
        logger.info("%s batch %d: %d edits, %d steps, %.2fs", self.method, report.batch, len(records), result.steps,
                    report.seconds)
        return report

    def prompt_positions(self, mask: torch.Tensor) -> ContextManager[None]:
        if isinstance(self.module, PromptRoutedFFN):
            return self.module.prompt_positions(mask)
        return nullcontext()

    def route_states(self, ffn_input: torch.Tensor, mask: torch.Tensor) -> list[int | None]:
        """Where each row goes, from layer L's FFN input on its prompt positions (`mask`); None where
        the method does not route (or defers)."""
        return [None] * int(ffn_input.shape[0])

    def route(self, prompts: Sequence[str], batch_size: int = 32) -> list[int | None]:
        """Where each prompt goes: `route_states` on a frozen pass that stops at layer L's FFN."""
        out: list[int | None] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompt_batch(self.tokenizer, prompts[start : start + batch_size]).to(self.input_device)
            states = capture_route_inputs(self.model, self.module, batch)
            out.extend(self.route_states(states, batch.attention_mask.to(states.device)))
        return out

    @torch.no_grad()
    def _decide_generate_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The decision of every prompt given to `generate`, taken once at its entry."""
        module = self.module
        attached = getattr(self.layers[self.layer_idx], self.layout.mlp_attr) is module
        if self.num_batches == 0 or not attached or not isinstance(module, PromptRoutedFFN):
            return None
        inputs = prompt_inputs(input_ids.to(self.input_device), attention_mask.to(self.input_device))
        states = capture_route_inputs(self.model, module, inputs)
        return module.decide(module.prepare(states), inputs.attention_mask.to(states.device))

    def routing_consistency(self) -> float | None:
        """Share of stored edits whose prompt still goes where it went when it was edited."""
        if not self.has_routing or not self.edits:
            return None
        routed = self.route([e["prompt"] for e in self.edits])
        return sum(r == e["expert"] for r, e in zip(routed, self.edits)) / len(self.edits)

    def pooled_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.method} has no routing space; plan the order with LEMoE's (lemoe.bench)")

    @contextmanager
    def disabled(self) -> Iterator[None]:
        parent = self.layers[self.layer_idx]
        setattr(parent, self.layout.mlp_attr, self.module.base_layer)
        try:
            yield
        finally:
            setattr(parent, self.layout.mlp_attr, self.module)

    def unload(self) -> nn.Module:
        if self._attached:
            setattr(self.layers[self.layer_idx], self.layout.mlp_attr, self.module.base_layer)
            if self.sequence_routing is not None:
                self.sequence_routing.remove()
                self.module.sequence = None
            self._attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError(f"this {self.method} editor was unloaded; create a new one to edit again")

    # -- persistence (the adapter directory format of lemoe.persistence, with `method` set)
    def save(self, directory: str | Path) -> None:
        state = AdapterState(config=self.config.to_dict(), base_model=self.identity, fingerprint=self.fingerprint,
                             layer=self.layer_idx, num_experts=self.num_batches, edits=self.edits,
                             lemoe_version=__version__, method=self.method)
        save_adapter(directory, state, self.state_tensors())

    @classmethod
    def load(cls, model: nn.Module, tokenizer: Any, directory: str | Path) -> "BaselineEditor":
        state, tensors = load_adapter(directory)
        if state.method != cls.method:
            raise AdapterError(f"{directory}: holds {state.method!r} state, not {cls.method!r}")
        check_adapter_matches(model, state, directory)
        config = cls.config_class.from_dict(state.config)
        editor = cls(model, tokenizer, config)
        try:
            if editor.layer_idx != state.layer:
                raise AdapterError(f"{directory}: config layer does not match the saved layer {state.layer}")
            editor.restore_state(tensors, state)
            editor.edits = [dict(e) for e in state.edits]
            editor.num_batches = state.num_experts
        except Exception:
            editor.unload()
            raise
        return editor


def expect_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...] | None]) -> None:
    """Refuse saved state whose tensor names or shapes (None: any) differ from what this config builds."""
    missing, unexpected = shapes.keys() - tensors.keys(), tensors.keys() - shapes.keys()
    if missing or unexpected:
        raise AdapterError(f"saved tensors do not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for name, shape in shapes.items():
        if shape is not None and tuple(tensors[name].shape) != shape:
            raise AdapterError(f"saved tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")

