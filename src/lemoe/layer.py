"""LEMoELayer: wraps one decoder layer's FFN as `base_layer` and adds routed experts beside it.

    y = FFN(x) + sum over the routed experts i of g_i * E_i(x)

Routing is decided once per sequence from its prompt tokens (see router.py) and reused for
every later call of the same sequence, so a KV-cached decode step (which sees one new token)
and an uncached one (which sees the whole sequence again) route alike; sequence_routing.py
says which calls belong to one sequence.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .config import LEMoEConfig
from .content import ContentTokens
from .models import FFNLayout
from .router import KVAnchorRouter, Route
from .sequence_routing import SequenceRouting
from .subject_router import SubjectRelationRouter, content_queries


class LoRAExpert(nn.Module):
    """E(x) = scaling * B A x with B = 0 at creation: a zero function until trained."""

    def __init__(self, hidden_size: int, rank: int, scaling: float, generator: torch.Generator) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.randn(rank, hidden_size, generator=generator) / hidden_size**0.5)
        self.lora_B = nn.Parameter(torch.zeros(hidden_size, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling  # (n, T, d)


class FFNExpert(nn.Module):
    """An FFN shaped like the base one; input projections start as copies, the output as zeros."""

    def __init__(self, base: nn.Module, layout: FFNLayout) -> None:
        super().__init__()
        self.act = getattr(base, layout.act_attr)
        self.gated = len(layout.in_projs) == 2
        weights = [_as_linear_weight(getattr(base, name), layout.conv1d) for name in layout.in_projs]
        d_ff, d_model = weights[0].shape
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.up.weight.data.copy_(weights[-1])
        if self.gated:
            self.gate = nn.Linear(d_model, d_ff, bias=False)
            self.gate.weight.data.copy_(weights[0])
        self.down = nn.Linear(d_ff, d_model, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))  # (n, T, d_ff)
        return self.down(hidden)  # (n, T, d)


def _as_linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if conv1d else weight  # (out, in)


@dataclass
class RoutingState:
    """What the layer is told about the current call by the editor's contexts and the route tap."""

    forced: torch.Tensor | None = None  # (B,) expert per sequence: training a new expert
    prompt_mask: torch.Tensor | None = None  # (B, T) explicit prompt positions: teacher-forced scoring
    tapped: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d) its FFN input, this call
    token_ids: torch.Tensor | None = None  # (B, T) input ids of this call (token tap), for content masks
    base_only: bool = False  # this thread wants the base model (LifelongEditor.disabled)


class LEMoELayer(nn.Module):
    """The FFN of one decoder layer plus a bank of routed experts."""

    def __init__(self, base_layer: nn.Module, layout: FFNLayout, hidden_size: int, config: LEMoEConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.config = config
        self.hidden_size = hidden_size
        self.router: KVAnchorRouter | SubjectRelationRouter = (
            SubjectRelationRouter(hidden_size, config) if config.key == "subject" else KVAnchorRouter(hidden_size, config))
        self.experts = nn.ModuleList()
        self.disabled = False  # every thread gets the base model
        # experts from this index on are being trained: no decision picks them (None: every expert fires)
        self.visible_experts: int | None = None
        # the layers whose FFN input routing reads (set by the editor); those below this one come from taps
        self.route_layer_idx: int | None = None
        self.subject_layer_idx: int | None = None
        self.tapped_layers: set[int] = set()
        self._routing_by_thread: dict[int, RoutingState] = {}  # generation runs beside an edit's training
        self.sequence: SequenceRouting | None = None  # set by the editor: decisions across a sequence's calls
        self.content: ContentTokens | None = None  # set by the editor for pooling 'content' or key 'subject'
        device = next(base_layer.parameters()).device
        self.router.to(device)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def routing(self) -> RoutingState:
        """This thread's routing state: one thread's training (a forced route) or scoring (prompt positions)
        never leaks into another thread's generation."""
        key = threading.get_ident()
        state = self._routing_by_thread.get(key)
        if state is None:
            state = self._routing_by_thread[key] = RoutingState()
        return state

    @property
    def off(self) -> bool:
        """The base model only, for this call: disabled for everyone, or for this thread."""
        return self.disabled or self.routing.base_only or self.num_experts == 0

    def new_expert(self) -> nn.Module:
        """A zero-function expert on the base layer's device, in fp32 (trains well for any model dtype)."""
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * (self.num_experts + 1))
        if self.config.expert == "lora":
            expert: nn.Module = LoRAExpert(self.hidden_size, self.config.lora_rank, self.config.lora_scale, generator)
        else:
            expert = FFNExpert(self.base_layer, self.layout)
        return expert.to(next(self.base_layer.parameters()).device)

    def add_expert(self, expert: nn.Module) -> int:
        """Append an expert. Its key is added by the router fit; until then nothing routes to it."""
        for param in expert.parameters():
            param.requires_grad_(False)
        self.experts.append(expert)
        return self.num_experts - 1

    def truncate(self, num_experts: int) -> None:
        del self.experts[num_experts:]
        self.router.truncate(num_experts)

    # ------------------------------------------------------------------ routing context

    @contextmanager
    def forced_route(self, experts: torch.Tensor) -> Iterator[None]:
        self.routing.forced = experts
        try:
            yield
        finally:
            self.routing.forced = None

    @contextmanager
    def prompt_positions(self, mask: torch.Tensor) -> Iterator[None]:
        """Route each row on the positions where `mask` is 1 (its prompt), whatever follows it."""
        self.routing.prompt_mask = mask
        try:
            yield
        finally:
            self.routing.prompt_mask = None

    def route(self, pooled: torch.Tensor) -> Route:
        """The pooled key's decision for (B, d) pooled vectors."""
        assert isinstance(self.router, KVAnchorRouter)
        return self.router.route(pooled.to(self.router.center.device), self.config.top_k, self.config.deferral,
                                 self.visible_experts)

    def decide(self, states: dict[int | None, torch.Tensor], mask: torch.Tensor) -> Route:
        """The decision for whole prompts: `states` maps a layer index to its FFN input (B, T, d), `mask`
        (B, T) the positions to route on (already narrowed to content tokens)."""
        route_states = states[self.route_layer_idx]
        if isinstance(self.router, KVAnchorRouter):
            return self.route(self.router.pool(route_states, mask))
        tokens, relations = content_queries(states[self.subject_layer_idx], route_states, mask)
        return self.router.route(tokens, relations, self.config.top_k, self.config.deferral, self.visible_experts)

    def observe(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Called by a tap with the FFN input of a lower layer that routing reads."""
        self.routing.tapped[layer_idx] = hidden

    def _routing_states(self, x: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """The states routing reads in this call: tapped lower layers' FFN inputs, and x for this layer."""
        states: dict[int | None, torch.Tensor] = {}
        for layer_idx in {self.route_layer_idx, self.subject_layer_idx}:
            if layer_idx not in self.tapped_layers:
                states[layer_idx] = x
                continue
            tapped = self.routing.tapped.pop(layer_idx, None)
            if tapped is None or tapped.shape[:2] != x.shape[:2]:
                raise RuntimeError(
                    "LEMoE: the routing states of this call are missing (a lower layer's FFN did not run before "
                    "the adaptor's layer); run the whole model rather than the adaptor's layer alone"
                )
            states[layer_idx] = tapped
        return states

    def routing_mask(self, mask: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The positions routing pools over: `mask` narrowed to content tokens (pooling 'content'), from
        `token_ids` or the ids the token tap saw in this call; `mask` itself when they are unknown."""
        ids = token_ids if token_ids is not None else self.routing.token_ids
        if self.content is None or ids is None or ids.shape != mask.shape:
            return mask
        return self.content.mask(ids, mask).to(mask.device)

    def _route_for(self, x: torch.Tensor) -> Route:
        state = self.routing
        batch, length = x.shape[:2]
        if state.forced is not None:
            state.tapped.clear()
            experts = state.forced.to(x.device).expand(batch).reshape(batch, 1)  # (1,) or (B,) -> (B, 1)
            return Route(experts, torch.ones(batch, 1, device=x.device))
        states = self._routing_states(x)
        if state.prompt_mask is not None:
            return self.decide(states, self.routing_mask(state.prompt_mask))
        sequence = self.sequence
        reuse = sequence.reusable(batch) if sequence is not None else None
        if reuse is not None:
            return self._existing(reuse.decision)
        mask = sequence.call_mask(batch, length) if sequence is not None else None
        if mask is None:
            mask = torch.ones(batch, length, device=x.device)
        route = self.decide(states, self.routing_mask(mask))
        if sequence is not None:
            sequence.remember(route)
        return route

    def _existing(self, route: Route) -> Route:
        """A decision taken earlier in the sequence; experts rolled back since then no longer fire."""
        experts = route.experts
        if bool((experts >= self.num_experts).any()):
            experts = torch.where(experts < self.num_experts, experts, torch.full_like(experts, -1))
            return Route(experts, route.gates)
        return route

    @torch.no_grad()
    def route_prompts(self, states: dict[int | None, torch.Tensor], mask: torch.Tensor,
                      token_ids: torch.Tensor | None = None) -> Route | None:
        """The decision for whole prompts (FFN inputs by layer, (B, T) mask and ids), taken at `generate`
        entry; None when nothing can fire."""
        if self.off:
            return None
        return self.decide(states, self.routing_mask(mask, token_ids))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)  # (B, T, d)
        if self.off:
            self.routing.tapped.clear()
            return base_out
        route = self._route_for(x)
        self.routing.token_ids = None  # this call's ids are used; a later call brings its own
        out = base_out
        for expert_id in torch.unique(route.experts[route.experts >= 0]).tolist():
            rows, slots = (route.experts == expert_id).nonzero(as_tuple=True)
            contribution = self.experts[expert_id](x[rows].float())  # (n, T, d)
            contribution = contribution * route.gates[rows, slots].view(-1, 1, 1)
            out = out.index_add(0, rows, contribution.to(out.dtype))
        return out


def install_token_tap(embedding: nn.Module, layer: LEMoELayer) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on the input embedding that hands each call's token ids to the adaptor (content masks)."""

    def tap(module: nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        layer.routing.token_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    return embedding.register_forward_pre_hook(tap)


def install_route_tap(ffn: nn.Module, layer_idx: int, layer: LEMoELayer) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on a lower layer's FFN that hands its input to the adaptor further up."""
    layer.tapped_layers.add(layer_idx)

    def tap(module: nn.Module, args: tuple[Any, ...]) -> None:
        layer.observe(layer_idx, args[0])

    return ffn.register_forward_pre_hook(tap)
