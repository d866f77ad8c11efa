"""Subject-and-relation routing (issue 12): an edit fires only where a query names its subject *and*
asks its relation.

A rephrase keeps both; a neighbour (same relation, other subject) keeps only the relation; a
same-subject question (other relation) keeps only the subject. One pooled vector per prompt mixes
the two and is dominated by the template, so each edit keeps two keys instead (docs/routing.md §6):

- subject: the states of the subject's tokens at a low layer (`subject_layer`, where a token is
  still mostly itself), each standardised and unit-normalised. A query's subject score for an edit
  is the mean over the edit's subject tokens of the best cosine with any of the query's content
  tokens (MaxSim, as late-interaction retrieval scores), so the rest of the prompt cannot drown it;
- relation: the state of the prompt's last content token at the route layer (where the model has
  gathered what is being asked), standardised and unit-normalised; scored by cosine.

An edit fires when both scores reach its thresholds; among the edits that fire, the best relation
score wins (ties: the newest edit, so a later correction overrides an earlier one) and its expert is
routed to. Statistics are fixed at the first edit and keys are frozen when their expert is made, so
a stored edit routes the same way forever.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig
from .router import AnchorFit, Route, hide_experts, no_route, top_k_route

_RECENCY = 1e-6  # per edit index: the newest of equal scores wins


def content_queries(subject_states: torch.Tensor, route_states: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A query per row of (B, T, d) states and a (B, T) content mask: the subject layer's states at the
    content positions (m, d), and the route layer's state at the last of them, stacked (B, d)."""
    tokens, relations = [], []
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().flatten()
        if positions.numel() == 0:  # nothing marked: the row's last position
            positions = torch.tensor([mask.shape[1] - 1], device=mask.device)
        tokens.append(subject_states[row, positions])  # (m, d)
        relations.append(route_states[row, positions[-1]])  # (d,)
    return tokens, torch.stack(relations)


class SubjectRelationRouter(nn.Module):
    def __init__(self, hidden_size: int, config: LEMoEConfig) -> None:
        super().__init__()
        self.config = config
        for name in ("token_center", "relation_center"):
            self.register_buffer(name, torch.zeros(hidden_size))
        for name in ("token_scale", "relation_scale"):
            self.register_buffer(name, torch.ones(hidden_size))
        self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("subject_tokens", torch.zeros(0, hidden_size))  # (K, d) unit, every edit's subject
        self.register_buffer("subject_owner", torch.zeros(0, dtype=torch.long))  # (K,) edit of each token
        self.register_buffer("relations", torch.zeros(0, hidden_size))  # (E, d) unit, one per edit
        self.register_buffer("anchor_experts", torch.zeros(0, dtype=torch.long))  # (E,) owner expert
        self.register_buffer("subject_thresholds", torch.zeros(0))  # (E,)
        self.register_buffer("relation_thresholds", torch.zeros(0))  # (E,)

    @property
    def num_experts(self) -> int:
        return int(self.anchor_experts.max()) + 1 if self.anchor_experts.numel() else 0

    @property
    def num_edits(self) -> int:
        return int(self.anchor_experts.shape[0])

    # ------------------------------------------------------------------ values

    def token_units(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize((states.float() - self.token_center) / self.token_scale, dim=-1)

    def relation_units(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize((states.float() - self.relation_center) / self.relation_scale, dim=-1)

    def fit_statistics(self, tokens: torch.Tensor, relations: torch.Tensor) -> None:
        """Fix both standardisations once: content-token states (N, d) and last-token states (M, d)."""
        self.token_center.copy_(tokens.float().mean(0))
        self.token_scale.copy_(tokens.float().std(0).clamp(min=1e-4))
        self.relation_center.copy_(relations.float().mean(0))
        self.relation_scale.copy_(relations.float().std(0).clamp(min=1e-4))
        self.stats_fitted.fill_(True)

    # ------------------------------------------------------------------ scoring

    def scores(self, query_tokens: list[torch.Tensor], query_relations: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query (B) and edit (E): the subject score (MaxSim) and the relation score, (B, E) each.
        `query_tokens[b]` is (m_b, d) raw states of query b's content tokens; `query_relations` (B, d) raw."""
        batch, edits = len(query_tokens), self.num_edits
        device = self.subject_tokens.device
        if edits == 0:
            empty = torch.zeros(batch, 0, device=device)
            return empty, empty
        rows = torch.cat([torch.full((len(t),), b, dtype=torch.long) for b, t in enumerate(query_tokens)]).to(device)
        tokens = self.token_units(torch.cat(list(query_tokens)).to(device))  # (M, d)
        sims = tokens @ self.subject_tokens.T  # (M, K)
        best = sims.new_full((batch, sims.shape[1]), -1.0).scatter_reduce(
            0, rows.unsqueeze(1).expand_as(sims), sims, reduce="amax")  # (B, K) best match per query
        counts = torch.zeros(edits, device=device).index_add_(0, self.subject_owner,
                                                             torch.ones_like(self.subject_owner, dtype=torch.float))
        subject = torch.zeros(batch, edits, device=device).index_add_(1, self.subject_owner, best)
        subject = subject / counts.clamp(min=1)  # (B, E)
        relation = self.relation_units(query_relations.to(device)) @ self.relations.T  # (B, E)
        return subject, relation

    def route(self, query_tokens: list[torch.Tensor], query_relations: torch.Tensor, top_k: int,
              deferral: bool, visible: int | None = None) -> Route:
        """`visible`: only experts below this index may fire (the others are still being trained)."""
        batch, device = len(query_tokens), self.subject_tokens.device
        experts = self.num_experts
        if experts == 0 or visible == 0:
            return no_route(batch, device)
        subject, relation = self.scores(query_tokens, query_relations)
        score = relation + torch.arange(self.num_edits, device=device) * _RECENCY  # (B, E)
        if deferral:
            fires = (subject >= self.subject_thresholds) & (relation >= self.relation_thresholds)
            score = score.masked_fill(~fires, float("-inf"))
        per_expert = score.new_full((batch, experts), float("-inf"))
        per_expert = per_expert.scatter_reduce(1, self.anchor_experts.expand(batch, -1), score, reduce="amax")
        return top_k_route(hide_experts(per_expert, visible), top_k)

    # ------------------------------------------------------------------ keys

    def add_expert_key(self, expert: int, subject_tokens: list[torch.Tensor], relations: torch.Tensor,
                       negative_tokens: list[torch.Tensor], negative_relations: torch.Tensor) -> AnchorFit:
        """Freeze the keys of a new expert's edits: `subject_tokens[i]` (n_i, d) raw states of edit i's
        subject, `relations` (B, d) raw last-token states. Reports how many generic negatives it rejects."""
        first = self.num_edits
        owners = torch.cat([torch.full((len(t),), first + i, dtype=torch.long) for i, t in enumerate(subject_tokens)])
        device = self.subject_tokens.device
        self.subject_tokens = torch.cat([self.subject_tokens, self.token_units(torch.cat(subject_tokens).to(device))])
        self.subject_owner = torch.cat([self.subject_owner, owners.to(device)])
        self.relations = torch.cat([self.relations, self.relation_units(relations.to(device))])
        count = len(subject_tokens)
        self.anchor_experts = torch.cat([self.anchor_experts, torch.full((count,), expert, dtype=torch.long,
                                                                         device=device)])
        self.subject_thresholds = torch.cat([self.subject_thresholds,
                                             torch.full((count,), self.config.subject_threshold, device=device)])
        self.relation_thresholds = torch.cat([self.relation_thresholds,
                                              torch.full((count,), self.config.relation_threshold, device=device)])
        if not negative_tokens:
            return AnchorFit(threshold=self.config.subject_threshold, max_negative=-1.0, negatives_rejected=1.0)
        subject, relation = self.scores(negative_tokens, negative_relations)
        mine = self.anchor_experts == expert
        fires = (subject[:, mine] >= self.subject_thresholds[mine]) & (relation[:, mine] >= self.relation_thresholds[mine])
        return AnchorFit(threshold=self.config.subject_threshold, max_negative=float(subject[:, mine].max()),
                         negatives_rejected=float((~fires.any(dim=1)).float().mean()))

    def truncate(self, num_experts: int) -> None:
        """Drop every expert index >= num_experts (rollback)."""
        keep = self.anchor_experts < num_experts
        kept_edits = int(keep.sum())
        self.relations = self.relations[keep].clone()
        self.anchor_experts = self.anchor_experts[keep].clone()
        self.subject_thresholds = self.subject_thresholds[keep].clone()
        self.relation_thresholds = self.relation_thresholds[keep].clone()
        tokens = self.subject_owner < kept_edits  # edits are stored in order, so kept edits come first
        self.subject_tokens = self.subject_tokens[tokens].clone()
        self.subject_owner = self.subject_owner[tokens].clone()
        if num_experts == 0:
            self.stats_fitted.fill_(False)

    def consistency(self) -> float:
        """Share of stored edits that route to their own expert when asked with their own keys (subject
        tokens as the query's tokens, their relation state), through today's thresholds."""
        if self.num_edits == 0:
            return float("nan")
        counts = torch.bincount(self.subject_owner, minlength=self.num_edits).tolist()
        tokens = torch.split(self.subject_tokens, counts)  # owners are stored in edit order
        raw_tokens = [t * self.token_scale + self.token_center for t in tokens]  # back to the raw space's direction
        raw_relations = self.relations * self.relation_scale + self.relation_center
        route = self.route(raw_tokens, raw_relations, 1, True)
        return float((route.experts[:, 0] == self.anchor_experts).float().mean())
