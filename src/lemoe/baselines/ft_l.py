"""FT-L: fine-tune the output projection of layer L's FFN on every batch, nothing frozen.

The naive lifelong baseline (Meng et al.'s FT-L, without retrieval or routing): each batch
keeps training the same weights, so later edits overwrite earlier ones and every input sees
the change. The change is kept as a delta `W' = W + D` beside the untouched base FFN, so `unload`
gives the original back and the saved state is D alone. An optional L-infinity bound on D is the
"constrained" variant of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import EditRecord
from ..encoding import TeacherForcedBatch
from ..persistence import AdapterState
from ..training import TrainResult, optimise
from .base import BaselineEditor, MethodConfig, expect_tensors
from .ffn import FFNParts


@dataclass
class FTLConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the delta"})
    norm_constraint: float | None = field(
        default=None, metadata={"help": "clamp every entry of the delta to +-this (None: unconstrained)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be positive or None, got {self.norm_constraint!r}")


class DeltaFFN(nn.Module):
    """base FFN whose output projection is W + delta."""

    def __init__(self, base_layer: nn.Module, parts: FFNParts) -> None:
        super().__init__()
        self.base_layer, self.parts = base_layer, parts
        d_model, d_ff = parts.out_shape()
        weight = parts.out_proj.weight
        self.delta = nn.Parameter(torch.zeros(d_model, d_ff, device=weight.device, dtype=torch.float32),
                                  requires_grad=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.parts.hidden(x)
        return self.parts.out(h) + (h.float() @ self.delta.T).to(x.dtype)


class FTLEditor(BaselineEditor):
    method = "ft-l"
    config_class = FTLConfig

    def build(self, base_ffn: nn.Module) -> nn.Module:
        return DeltaFFN(base_ffn, FFNParts(base_ffn, self.layout))

    def train_batch(self, records: list[EditRecord], batch: TeacherForcedBatch, layer_input: torch.Tensor,
                    ffn_input: torch.Tensor) -> tuple[TrainResult, int]:
        delta = self.module.delta
        bound = self.config.norm_constraint

        def project() -> None:
            if bound is not None:
                with torch.no_grad():
                    delta.clamp_(-bound, bound)

        result = optimise(self.model, self.layers, self.layer_idx, batch, layer_input, [delta],
                          self.config.optimise_settings(), after_step=project)
        return result, 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.module.delta.detach()}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
        expect_tensors(tensors, {"delta": tuple(self.module.delta.shape)})
        with torch.no_grad():
            self.module.delta.copy_(tensors["delta"])
