"""WISE (Wang et al., NeurIPS 2024): a side memory beside layer L's FFN output projection.

- Side memory: a copy W' of the output projection W (kept as the delta W' - W), edited while
  W stays the main memory.
- Router: Delta(x) = mean over the prompt tokens of ||h_t (W' - W)^T||, the size of the side
  memory's change to the activation; a prompt uses the side memory where Delta(x) exceeds
  `act_ratio` x the smallest Delta seen on an edit, the main memory otherwise.
- Training: answer NLL plus the paper's margin loss on activations, which pushes Delta above
  `beta` for edits, below `alpha` for unrelated prompts (lemoe's built-in negatives, never the
  locality questions being scored) and apart by `gamma`.
- Knowledge shards: each shard edits only a random `mask_ratio` of the side memory's entries,
  starting from the merged side memory; after `shard_edits` edits a new shard begins, and when
  `num_shards` shards are full they are merged into the side memory with TIES (sign election,
  then the mean of the agreeing entries). Until then the shards of the round are TIES-merged for
  inference after every batch.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import EditRecord
from ..encoding import TeacherForcedBatch, prompt_batch
from ..persistence import AdapterState
from ..training import TrainResult, capture_route_inputs, optimise
from .base import BaselineEditor, MethodConfig, PromptRoutedFFN, expect_tensors
from .ffn import FFNParts


@dataclass
class WISEConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the side memory shard"})
    max_steps: int = field(default=70, metadata={"help": "upper bound on optimisation steps per batch"})
    mask_ratio: float = field(default=0.2, metadata={"help": "share of side-memory entries a shard may change"})
    shard_edits: int = field(default=500, metadata={"help": "edits written into one shard before the next begins"})
    num_shards: int = field(default=2, metadata={"help": "shards merged into the side memory at a time"})
    act_ratio: float = field(default=0.88, metadata={"help": "routing threshold = this x the smallest edit Delta"})
    alpha: float = field(default=5.0, metadata={"help": "margin: Delta of unrelated prompts kept below this"})
    beta: float = field(default=20.0, metadata={"help": "margin: Delta of edits pushed above this"})
    gamma: float = field(default=10.0, metadata={"help": "margin: edits' Delta exceeds unrelated prompts' by this"})
    negatives_per_batch: int = field(default=16, metadata={"help": "unrelated prompts in each batch's margin loss"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio!r}")
        for name in ("shard_edits", "num_shards", "negatives_per_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("act_ratio", "alpha", "beta", "gamma"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")


def ties_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES merging without trimming: elect each entry's sign by the summed deltas, average those that agree."""
    if len(deltas) == 1:
        return deltas[0].clone()
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


class SideMemoryFFN(PromptRoutedFFN):
    """Main memory W (the base FFN) and side memory W + side; `decide` routes a prompt to one of them."""

    def __init__(self, base_layer: nn.Module, parts: FFNParts) -> None:
        super().__init__(base_layer)
        self.parts = parts
        shape = parts.out_shape()
        device = parts.out_proj.weight.device
        self.register_buffer("merged", torch.zeros(shape, device=device))  # side memory at the round's start
        self.register_buffer("side", torch.zeros(shape, device=device))  # what inference uses
        self.register_buffer("threshold", torch.tensor(float("inf"), device=device))
        self.shard = nn.Parameter(torch.zeros(shape, device=device), requires_grad=False)
        self.register_buffer("shard_mask", torch.zeros(shape, dtype=torch.bool, device=device))

    def training_delta(self) -> torch.Tensor:
        """The side memory a shard trains: the merged memory plus this shard's masked change."""
        return self.merged + self.shard * self.shard_mask

    def activation_delta(self, h: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(B,) mean over masked tokens of ||h_t delta^T||: how much the side memory changes this input."""
        norms = (h.float() @ delta.T).norm(dim=-1)  # (B, T)
        mask = mask.to(norms.dtype)
        return (norms * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN hidden activation h: the router and both memories read it."""
        return self.parts.hidden(x)

    def decide(self, prepared: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(self.threshold):
            return torch.zeros(prepared.shape[0], dtype=torch.bool, device=prepared.device)
        return self.activation_delta(prepared, mask, self.side) > self.threshold

    def apply(self, x: torch.Tensor, prepared: torch.Tensor, decision: Any, mask: torch.Tensor,
              decoding: bool) -> torch.Tensor:
        h = prepared
        out = self.parts.out(h)
        if isinstance(decision, str):  # "train": the shard being trained, for every row
            return out + (h.float() @ self.training_delta().T).to(out.dtype)
        use_side = decision.to(x.device)
        if not bool(use_side.any()):
            return out
        change = (h.float() @ self.side.T).to(out.dtype)
        return out + change * use_side.view(-1, 1, 1).to(out.dtype)


class WISEEditor(BaselineEditor):
    method = "wise"
    config_class = WISEConfig
    has_routing = True

    def __init__(self, model: nn.Module, tokenizer: Any, config: WISEConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.round_shards: list[torch.Tensor] = []  # finished shards of this round (deltas from `merged`)
        self.shard_start = 0  # edits written before the current shard began
        self._negative_hidden: tuple[torch.Tensor, torch.Tensor] | None = None

    def build(self, base_ffn: nn.Module) -> nn.Module:
        return SideMemoryFFN(base_ffn, FFNParts(base_ffn, self.layout))

    def _hidden_of(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = prompt_batch(self.tokenizer, list(prompts)).to(self.input_device)
        with torch.no_grad():
            h = self.module.parts.hidden(capture_route_inputs(self.model, self.module, batch))
        return h, batch.attention_mask.to(h.device)

    def _negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._negative_hidden is None:
            from ..editor import builtin_negatives

            self._negative_hidden = self._hidden_of(builtin_negatives())
        return self._negative_hidden

    def _new_shard(self) -> None:
        module = self.module
        mask = torch.rand(module.shard.shape, generator=self.generator) < self.config.mask_ratio
        module.shard_mask = mask.to(module.shard_mask.device)
        module.shard = nn.Parameter(torch.zeros_like(module.shard), requires_grad=False)

    def train_batch(self, records: list[EditRecord], batch: TeacherForcedBatch, layer_input: torch.Tensor,
                    ffn_input: torch.Tensor) -> tuple[TrainResult, int]:
        module, config = self.module, self.config
        edits_so_far = len(self.edits)
        if not bool(module.shard_mask.any()):  # the first batch, or the previous shard is full
            self._new_shard()
            self.shard_start = edits_so_far
        edit_h = module.parts.hidden(ffn_input).detach()
        edit_mask = batch.prompt_mask.to(edit_h.device)
        neg_h_all, neg_mask_all = self._negatives()
        pick = torch.randperm(neg_h_all.shape[0], generator=self.generator)[: config.negatives_per_batch]
        neg_h, neg_mask = neg_h_all[pick.to(neg_h_all.device)], neg_mask_all[pick.to(neg_mask_all.device)]

        def margin_loss() -> torch.Tensor:
            delta = module.training_delta()
            edit_act = module.activation_delta(edit_h, edit_mask, delta)  # (B,)
            neg_act = module.activation_delta(neg_h, neg_mask, delta)  # (K,)
            return (F.relu(neg_act - config.alpha).mean() + F.relu(config.beta - edit_act).mean()
                    + F.relu(config.gamma - (edit_act.view(-1, 1) - neg_act.view(1, -1))).mean())

        with ExitStack() as stack:
            stack.enter_context(module.forced("train"))
            result = optimise(self.model, self.layers, self.layer_idx, batch, layer_input, [module.shard],
                              config.optimise_settings(), extra_loss=margin_loss)
        with torch.no_grad():
            edit_act = module.activation_delta(edit_h, edit_mask, module.training_delta())
            module.threshold = torch.minimum(module.threshold, config.act_ratio * edit_act.min()).to(
                module.threshold.device)
        self._after_batch(edits_so_far + len(records))
        return result, 0

    def _after_batch(self, edits_total: int) -> None:
        """Close the shard when it is full; merge the round when all its shards are; refresh the inference memory."""
        module, config = self.module, self.config
        current = (module.shard * module.shard_mask).detach()
        shard_full = edits_total - self.shard_start >= config.shard_edits
        shards = self.round_shards + [current]
        if shard_full:
            self.round_shards.append(current)
            module.shard_mask = torch.zeros_like(module.shard_mask)
        module.side = module.merged + ties_merge(shards)
        if shard_full and len(self.round_shards) == config.num_shards:
            module.merged = module.side.clone()
            self.round_shards = []

    def route_states(self, ffn_input: torch.Tensor, mask: torch.Tensor) -> list[int | None]:
        """0 where a row is routed to the side memory, None where the main memory answers it."""
        use = self.module.decide(self.module.prepare(ffn_input), mask)
        return [0 if u else None for u in use.tolist()]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        m = self.module
        tensors = {"merged": m.merged, "side": m.side, "threshold": m.threshold, "shard": m.shard.detach(),
                   "shard_mask": m.shard_mask.to(torch.uint8), "generator_state": self.generator.get_state(),
                   "shard_start": torch.tensor(self.shard_start)}
        tensors.update({f"round_shard.{i}": s for i, s in enumerate(self.round_shards)})
        return tensors

    def restore_state(self, tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
        m = self.module
        shape = tuple(m.merged.shape)
        shards = sorted(k for k in tensors if k.startswith("round_shard."))
        expect_tensors(tensors, {"merged": shape, "side": shape, "threshold": (), "shard": shape,
                                 "shard_mask": shape, "generator_state": None, "shard_start": (),
                                 **{k: shape for k in shards}})
        device = m.merged.device
        m.merged, m.side = tensors["merged"].to(device), tensors["side"].to(device)
        m.threshold = tensors["threshold"].to(device)
        m.shard = nn.Parameter(tensors["shard"].to(device), requires_grad=False)
        m.shard_mask = tensors["shard_mask"].to(device).bool()
        self.generator.set_state(tensors["generator_state"])
        self.shard_start = int(tensors["shard_start"])
        self.round_shards = [tensors[f"round_shard.{i}"].to(device) for i in range(len(shards))]
