"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of keys at layer L with deferral radii.

Each edit's key is the FFN input of layer L at the last prompt token. A prompt whose key lies
within the radius of its nearest codebook entry gets that entry's learned value in place of the
FFN output, from the last prompt token on (the positions that produce the answer, and every
decoded token); all other inputs get the unchanged FFN. Codebook updates follow the paper: a key
farther than (its radius + `radius`) from every entry adds an entry; a key near an entry with the
same target widens that entry's radius to reach it; a key near an entry with another target
splits the two radii at half their distance and adds its own entry. Values start as the FFN's
output at the key and are trained on the edit's answer.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import EditRecord
from ..encoding import TeacherForcedBatch
from ..persistence import AdapterState
from ..training import TrainResult, optimise
from .base import BaselineEditor, MethodConfig, PromptRoutedFFN, expect_tensors, last_positions


@dataclass
class GRACEConfig(MethodConfig):
    radius: float = field(default=3.0, metadata={"help": "initial deferral radius of a new key (Euclidean, "
                                                 "FFN-input space; tuned for SmolLM2, see docs/baselines.md)"})
    lr: float = field(default=5e-1, metadata={"help": "AdamW learning rate of the values"})
    max_steps: int = field(default=60, metadata={"help": "upper bound on value optimisation steps per batch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.radius, (int, float)) or not self.radius > 0:
            raise ValueError(f"radius must be a positive number, got {self.radius!r}")


class CodebookFFN(PromptRoutedFFN):
    """The base FFN plus a GRACE codebook: keys (n, d), values (n, d), radii (n,)."""

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__(base_layer)
        device = next(base_layer.parameters()).device
        self.register_buffer("keys", torch.zeros(0, hidden_size, device=device))
        self.register_buffer("radii", torch.zeros(0, device=device))
        self.values = nn.Parameter(torch.zeros(0, hidden_size, device=device), requires_grad=False)

    def decide(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) entry each row hits, -1 where it is outside every radius."""
        if self.keys.shape[0] == 0:
            return torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        query = x[torch.arange(x.shape[0], device=x.device), last_positions(mask)].float()
        distance = torch.cdist(query, self.keys.to(query.device))  # (B, n)
        nearest, entry = distance.min(dim=1)
        return torch.where(nearest <= self.radii.to(query.device)[entry], entry, torch.full_like(entry, -1))

    def apply(self, x: torch.Tensor, prepared: torch.Tensor, decision: torch.Tensor, mask: torch.Tensor,
              decoding: bool) -> torch.Tensor:
        out = self.base_layer(x)
        decision = decision.to(x.device)
        if not bool((decision >= 0).any()):
            return out
        positions = torch.arange(x.shape[1], device=x.device).view(1, -1)
        start = torch.zeros_like(decision) if decoding else last_positions(mask)
        replace = (positions >= start.view(-1, 1)) & (decision >= 0).view(-1, 1)  # (B, T)
        value = self.values[decision.clamp(min=0)].to(out.dtype)  # (B, d)
        return torch.where(replace.unsqueeze(-1), value.unsqueeze(1), out)


class GRACEEditor(BaselineEditor):
    method = "grace"
    config_class = GRACEConfig
    has_routing = True

    def build(self, base_ffn: nn.Module) -> nn.Module:
        return CodebookFFN(base_ffn, int(self.model.get_input_embeddings().weight.shape[1]))

    @property
    def entry_labels(self) -> list[str]:
        labels: dict[int, str] = {}
        for e in self.edits:
            labels.setdefault(e["expert"], e["target"])
        return [labels[i] for i in range(len(labels))]

    def train_batch(self, records: list[EditRecord], batch: TeacherForcedBatch, layer_input: torch.Tensor,
                    ffn_input: torch.Tensor) -> tuple[TrainResult, list[int]]:
        book = self.module
        rows = torch.arange(batch.size, device=ffn_input.device)
        queries = ffn_input[rows, last_positions(batch.prompt_mask.to(ffn_input.device))].float()
        with torch.no_grad():
            initial = book.base_layer(queries.to(ffn_input.dtype).unsqueeze(1)).squeeze(1).float()
        labels = self.entry_labels
        entries: list[int] = []
        keys, radii, values = book.keys, book.radii.clone(), book.values.detach()
        for i, record in enumerate(records):
            query = queries[i : i + 1].to(keys.device)
            if keys.shape[0]:
                distance, nearest = torch.cdist(query, keys)[0].min(dim=0)
                d, j = float(distance), int(nearest)
            if keys.shape[0] == 0 or d > self.config.radius + float(radii[j]):
                new_radius = self.config.radius
            elif labels[j] == record.target:
                radii[j] = max(float(radii[j]), d)  # widen the entry to cover this key
                entries.append(j)
                continue
            else:
                radii[j] = new_radius = d / 2  # conflicting targets: split the space between them
            keys = torch.cat([keys, query])
            radii = torch.cat([radii, torch.tensor([new_radius], device=radii.device)])
            values = torch.cat([values, initial[i : i + 1].to(values.device)])
            labels.append(record.target)
            entries.append(keys.shape[0] - 1)
        book.keys, book.radii = keys, radii
        book.values = nn.Parameter(values.clone(), requires_grad=False)
        forced = torch.tensor(entries, dtype=torch.long)
        with ExitStack() as stack:
            stack.enter_context(book.forced(forced))
            stack.enter_context(book.prompt_positions(batch.prompt_mask))
            result = optimise(self.model, self.layers, self.layer_idx, batch, layer_input, [book.values],
                              self.config.optimise_settings())
        return result, entries

    def route_states(self, ffn_input: torch.Tensor, mask: torch.Tensor) -> list[int | None]:
        """The codebook entry each row hits, or None where GRACE defers to the base FFN."""
        return [int(e) if e >= 0 else None for e in self.module.decide(ffn_input, mask).tolist()]

    @property
    def num_experts(self) -> int:
        return int(self.module.keys.shape[0])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        book = self.module
        return {"keys": book.keys, "radii": book.radii, "values": book.values.detach()}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
        n = int(tensors["keys"].shape[0]) if "keys" in tensors else -1
        d = int(self.module.keys.shape[1])
        expect_tensors(tensors, {"keys": (n, d), "radii": (n,), "values": (n, d)})
        if any(not 0 <= e["expert"] < n for e in state.edits):
            raise ValueError("saved GRACE edits point outside the codebook")
        device = self.module.keys.device
        self.module.keys, self.module.radii = tensors["keys"].to(device), tensors["radii"].to(device)
        self.module.values = nn.Parameter(tensors["values"].to(device), requires_grad=False)
