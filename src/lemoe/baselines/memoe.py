"""MEMoE-style MoE adaptor with a conventional learned router: the non-lifelong MoE LEMoE diagnoses.

A fixed pool of LoRA experts beside layer L's FFN and a linear gate over each token's FFN input
(top-k of a softmax, renormalised). Every batch trains the gate and all experts together, so
earlier edits are overwritten (forgetting) and the gate's choice for an old prompt drifts away
from the expert it was trained through (inconsistent routing, measured by `routing_consistency`).
There is no deferral: every input goes through some expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import EditRecord
from ..encoding import TeacherForcedBatch
from ..layer import LoRAExpert
from ..persistence import AdapterState
from ..training import TrainResult, optimise
from .base import BaselineEditor, MethodConfig, expect_tensors


@dataclass
class MEMoEConfig(MethodConfig):
    num_experts: int = field(default=4, metadata={"help": "experts in the pool (fixed; all trained every batch)"})
    top_k: int = field(default=1, metadata={"help": "experts mixed per token"})
    lora_rank: int = field(default=64, metadata={"help": "bottleneck width of each expert"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate of experts and gate"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "top_k", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")


class GatedMoEFFN(nn.Module):
    """out = FFN(x) + sum over the top-k experts of gate_e(x) * E_e(x), per token."""

    def __init__(self, base_layer: nn.Module, hidden_size: int, config: MEMoEConfig) -> None:
        super().__init__()
        self.base_layer, self.top_k = base_layer, config.top_k
        generator = torch.Generator().manual_seed(config.seed)
        device = next(base_layer.parameters()).device
        self.experts = nn.ModuleList(
            LoRAExpert(hidden_size, config.lora_rank, 1.0, generator) for _ in range(config.num_experts)).to(device)
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=False).to(device)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, hidden_size**-0.5, generator=generator)
        for param in self.parameters(recurse=True):
            param.requires_grad_(False)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, k) chosen experts and their renormalised weights."""
        probs = torch.softmax(self.gate(x.float()), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        experts, weights = self.gates(x)
        mixed = torch.zeros_like(out, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            weight = (weights * (experts == e)).sum(dim=-1, keepdim=True)  # (B, T, 1), 0 where not chosen
            if bool((weight > 0).any()):
                mixed = mixed + weight * expert(x.float())
        return out + mixed.to(out.dtype)


class MEMoEEditor(BaselineEditor):
    method = "memoe"
    config_class = MEMoEConfig
    has_routing = True

    def build(self, base_ffn: nn.Module) -> nn.Module:
        hidden = int(self.model.get_input_embeddings().weight.shape[1])
        return GatedMoEFFN(base_ffn, hidden, self.config)

    def train_batch(self, records: list[EditRecord], batch: TeacherForcedBatch, layer_input: torch.Tensor,
                    ffn_input: torch.Tensor) -> tuple[TrainResult, list[int]]:
        params = [*self.module.experts.parameters(), *self.module.gate.parameters()]
        result = optimise(self.model, self.layers, self.layer_idx, batch, layer_input, params,
                          self.config.optimise_settings())
        return result, self._majority_experts(ffn_input, batch.prompt_mask)

    def _majority_experts(self, ffn_input: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Per row, the expert most of its prompt tokens pick (top-1)."""
        with torch.no_grad():
            experts, _ = self.module.gates(ffn_input)
        top = experts[..., 0]
        out = []
        for row in range(top.shape[0]):
            chosen = top[row][mask[row].bool().to(top.device)]
            out.append(int(torch.bincount(chosen, minlength=self.config.num_experts).argmax()))
        return out

    def route_states(self, ffn_input: torch.Tensor, mask: torch.Tensor) -> list[int | None]:
        """The expert most of each row's prompt tokens are gated to, through the current gate."""
        return list(self._majority_experts(ffn_input, mask))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.module.state_dict().items() if not k.startswith("base_layer.")}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
        expect_tensors(tensors, {k: tuple(v.shape) for k, v in self.state_tensors().items()})
        self.module.load_state_dict({**self.module.base_layer.state_dict(prefix="base_layer."), **tensors})

