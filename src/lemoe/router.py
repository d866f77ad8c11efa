"""KV anchor routing: values from prompts, frozen anchor keys per expert, top-k, deferral regions.

An input sequence becomes one vector e: the mean (or last) of the FFN inputs of the route layer
(a layer at or below the adaptor's, see LEMoEConfig.route_layer) over its prompt tokens. Its value v is e
standardised with statistics fixed at the first edit, then unit-normalised: raw hidden states
are anisotropic (unrelated questions sit at cosine > 0.8), standardised ones are not. The statistics
never change afterwards, so neither does any value.

Every expert's key is the set of its edits' values (one anchor per edit, frozen when the expert
is made): a batch of unrelated facts has no single centre, and one key per batch misrouted 14 %
of its own prompts in our measurement (see docs/routing.md). Expert i scores
s_i = max over its anchors of cos(anchor, v); it accepts the input when s_i >= t_i, its acceptance
region, fitted to reject generic unrelated prompts and never wider than cosine `route_floor`.
The top-k accepted experts fire, with gates renormalised over them, so adding an expert never
rescales an older one's output. An input that no expert accepts gets exactly the base model's
output. On an exact tie (the same prompt edited twice) the newer expert wins, so a later
correction overrides an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig

GATE_SCALE = 10.0  # cosine scores -> softmax logits when top_k > 1
_RECENCY = 1e-6  # per expert index: breaks exact ties in favour of the newest expert


@dataclass
class Route:
    """Per-sequence routing decision: expert indices (B, k), -1 where none fires, and gates (B, k)."""

    experts: torch.Tensor
    gates: torch.Tensor

    def top1(self) -> list[int | None]:
        return [int(e) if int(e) >= 0 else None for e in self.experts[:, 0].tolist()]


@dataclass
class AnchorFit:
    """How a new expert's region separates its own prompts from the generic negatives (cosine)."""

    threshold: float
    max_negative: float
    negatives_rejected: float


def no_route(batch: int, device: torch.device | str) -> Route:
    """Every row deferred: what a router without experts decides."""
    return Route(torch.full((batch, 1), -1, dtype=torch.long, device=device), torch.zeros(batch, 1, device=device))


def hide_experts(scores: torch.Tensor, visible: int | None) -> torch.Tensor:
    """(B, N) expert scores with the experts from index `visible` on set to -inf (None: none hidden)."""
    if visible is None or visible >= scores.shape[1]:
        return scores
    hidden = torch.arange(scores.shape[1], device=scores.device) >= visible  # (N,)
    return scores.masked_fill(hidden, float("-inf"))


def top_k_route(scores: torch.Tensor, top_k: int) -> Route:
    """(B, N) expert scores, -inf where an expert does not accept the row -> the top-k accepted experts,
    gates renormalised over them (-1 and gate 0 in slots nothing fills)."""
    k = min(top_k, scores.shape[1])
    top_scores, top_experts = scores.topk(k, dim=-1)  # (B, k)
    fires = torch.isfinite(top_scores)
    gates = torch.softmax((top_scores * GATE_SCALE).masked_fill(~fires, float("-inf")), dim=-1)
    gates = torch.nan_to_num(gates, nan=0.0)  # rows where nothing fires
    return Route(torch.where(fires, top_experts, torch.full_like(top_experts, -1)), gates)


def pool_states(hidden: torch.Tensor, mask: torch.Tensor, last: bool = False) -> torch.Tensor:
    """(B, T, d) states and (B, T) mask -> (B, d): the mean over the masked positions, or the last one."""
    hidden = hidden.float()
    mask = mask.to(hidden.device, torch.float32)
    if last:
        # last masked position of each row (works for left and right padding)
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        end = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(dim=1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), end]
    summed = torch.einsum("btd,bt->bd", hidden, mask)  # (B, d)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


class KVAnchorRouter(nn.Module):
    def __init__(self, hidden_size: int, config: LEMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("anchors", torch.zeros(0, hidden_size))  # (E, d) unit values, one per edit
        self.register_buffer("anchor_pooled", torch.zeros(0, hidden_size))  # (E, d) the prompts' pooled vectors
        self.register_buffer("anchor_experts", torch.zeros(0, dtype=torch.long))  # (E,) owner expert
        self.register_buffer("thresholds", torch.zeros(0))  # (N,) one acceptance threshold per expert

    @property
    def num_experts(self) -> int:
        return int(self.thresholds.shape[0])

    # ------------------------------------------------------------------ forward pieces

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) states and (B, T) prompt mask -> (B, d) pooled prompt vector, in fp32."""
        return pool_states(hidden, mask, last=self.config.pooling == "last")

    def value(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) pooled -> (B, d) unit-norm value."""
        return F.normalize((pooled.float() - self.center) / self.scale, dim=-1)

    def expert_scores(self, values: torch.Tensor) -> torch.Tensor:
        """(B, d) values -> (B, N) score of every expert: one matrix product, then a max per expert."""
        sims = values @ self.anchors.T  # (B, E)
        scores = sims.new_full((values.shape[0], self.num_experts), float("-inf"))
        index = self.anchor_experts.expand(values.shape[0], -1)
        scores = scores.scatter_reduce(1, index, sims, reduce="amax")
        recency = torch.arange(self.num_experts, device=scores.device, dtype=scores.dtype) * _RECENCY
        return scores + recency  # (B, N)

    def route_values(self, values: torch.Tensor, top_k: int, deferral: bool, visible: int | None = None) -> Route:
        """`visible`: only experts below this index may fire (the others are still being trained)."""
        if self.num_experts == 0 or visible == 0:
            return no_route(values.shape[0], values.device)
        scores = self.expert_scores(values)  # (B, N)
        if deferral:
            scores = scores.masked_fill(scores < self.thresholds, float("-inf"))
        return top_k_route(hide_experts(scores, visible), top_k)

    def route(self, pooled: torch.Tensor, top_k: int, deferral: bool, visible: int | None = None) -> Route:
        return self.route_values(self.value(pooled), top_k, deferral, visible)

    # ------------------------------------------------------------------ adding an expert's key

    def fit_statistics(self, pooled: torch.Tensor) -> None:
        """Fix the standardisation once, from the first batch's prompts and the generic negatives."""
        self.center.copy_(pooled.float().mean(dim=0))
        self.scale.copy_(pooled.float().std(dim=0).clamp(min=1e-4))
        self.stats_fitted.fill_(True)

    def add_expert_key(self, positives: torch.Tensor, negatives: torch.Tensor) -> AnchorFit:
        """Freeze the anchors of a new expert (its batch's prompts, (B, d)) and fit its region.

        The threshold sits `route_margin` above the best-scoring generic negative (M, d), so an
        input must be closer to one of the edits than any unrelated prompt is, and never below
        `route_floor`. Earlier anchors and thresholds are never modified.
        """
        expert = self.num_experts
        anchors = self.value(positives)  # (B, d)
        if negatives.shape[0]:
            neg_scores = (self.value(negatives) @ anchors.T).amax(dim=1)  # (M,)
            max_negative = float(neg_scores.max())
        else:
            neg_scores, max_negative = anchors.new_zeros(0), -1.0
        threshold = min(max(max_negative + self.config.route_margin, self.config.route_floor), 1.0 - 1e-3)
        if not self.config.deferral:
            threshold = float("-inf")
        owners = torch.full((anchors.shape[0],), expert, dtype=torch.long, device=anchors.device)
        self.anchors = torch.cat([self.anchors, anchors], dim=0)
        self.anchor_pooled = torch.cat([self.anchor_pooled, positives.detach().float()], dim=0)
        self.anchor_experts = torch.cat([self.anchor_experts, owners])
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_tensor([threshold])])
        rejected = float((neg_scores < threshold).float().mean()) if neg_scores.numel() else 1.0
        return AnchorFit(threshold=threshold, max_negative=max_negative, negatives_rejected=rejected)

    def truncate(self, num_experts: int) -> None:
        """Drop every expert index >= num_experts (rollback)."""
        keep = self.anchor_experts < num_experts
        self.anchors = self.anchors[keep].clone()
        self.anchor_pooled = self.anchor_pooled[keep].clone()
        self.anchor_experts = self.anchor_experts[keep].clone()
        self.thresholds = self.thresholds[:num_experts].clone()
        if num_experts == 0:
            self.stats_fitted.fill_(False)
