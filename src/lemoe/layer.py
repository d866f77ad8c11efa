"""LEMoELayer: wraps one decoder layer's FFN as `base_layer` and adds routed experts beside it.

    y = FFN(x) + sum over the routed experts i of g_i * E_i(x)

Routing is decided once per sequence from its prompt tokens (see router.py) and reused for
every later decode step of the same sequence, so a KV-cached decode step (which sees one new
token) and an uncached one (which sees the whole sequence again) route alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .config import LEMoEConfig
from .models import FFNLayout
from .router import KVAnchorRouter, Route


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
    """What the layer knows about the current call; reset per call by the model's pre-hook."""

    forced: torch.Tensor | None = None  # (B,) expert per sequence: training a new expert
    prompt_mask: torch.Tensor | None = None  # (B, T) explicit prompt positions: teacher-forced scoring
    call_mask: torch.Tensor | None = None  # (B, T) attention mask of the pending call
    call_ids: torch.Tensor | None = None
    call_reuse: bool = False  # the pending call continues the cached sequence
    call_seen: bool = False
    cached_ids: torch.Tensor | None = None
    cached_route: Route | None = None
    route_input: torch.Tensor | None = None  # (B, T, d) FFN input of the route layer, this call (route tap)


class LEMoELayer(nn.Module):
    """The FFN of one decoder layer plus a bank of routed experts."""

    def __init__(self, base_layer: nn.Module, layout: FFNLayout, hidden_size: int, config: LEMoEConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.config = config
        self.hidden_size = hidden_size
        self.router = KVAnchorRouter(hidden_size, config)
        self.experts = nn.ModuleList()
        self.disabled = False
        self.routes_elsewhere = False  # True when a route tap on a lower layer supplies the routing states
        self.routing = RoutingState()
        device = next(base_layer.parameters()).device
        self.router.to(device)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

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
        self.reset_routing_cache()

    # ------------------------------------------------------------------ routing context

    def observe_call(self, ids: torch.Tensor | None, mask: torch.Tensor | None, past_len: int) -> None:
        """Called before every forward of the whole model (pre-hook) with what the call carries."""
        state = self.routing
        state.call_seen = True
        state.call_ids, state.call_mask = ids, mask
        cached = state.cached_route
        batch = ids.shape[0] if ids is not None else (mask.shape[0] if mask is not None else None)
        same_batch = cached is not None and batch is not None and cached.experts.shape[0] == batch
        if past_len > 0:
            state.call_reuse = same_batch
        elif same_batch and ids is not None and state.cached_ids is not None:
            prompt_len = state.cached_ids.shape[1]
            state.call_reuse = ids.shape[1] >= prompt_len and bool(
                torch.equal(ids[:, :prompt_len], state.cached_ids.to(ids.device))
            )
        else:
            state.call_reuse = False

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
        return self.router.route(pooled.to(self.router.center.device), self.config.top_k, self.config.deferral)

    def observe_route_input(self, hidden: torch.Tensor) -> None:
        """Called by the route tap with the FFN input of the route layer (when it is below this one)."""
        self.routing.route_input = hidden

    def _routing_states(self, x: torch.Tensor) -> torch.Tensor:
        """The states the route is pooled from: the route layer's FFN input of this same call, or x."""
        if not self.routes_elsewhere:
            return x
        states, self.routing.route_input = self.routing.route_input, None
        if states is None or states.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                "LEMoE: the routing states of this call are missing (the route layer's FFN did not run before "
                "the adaptor's layer); run the whole model rather than the adaptor's layer alone"
            )
        return states

    def _route_for(self, x: torch.Tensor) -> Route:
        state = self.routing
        batch, length = x.shape[:2]
        if state.forced is not None:
            state.route_input = None
            experts = state.forced.to(x.device).view(batch, 1)
            return Route(experts, torch.ones(batch, 1, device=x.device))
        states = self._routing_states(x)
        if state.prompt_mask is not None:
            return self.route(self.router.pool(states, state.prompt_mask))
        seen, reuse, mask, ids = self._consume_call()
        if seen and ids is not None and ids.shape[1] != length:
            seen, reuse, mask, ids = False, False, None, None  # not the call the hook saw: route afresh
        if seen and reuse and state.cached_route is not None:
            return state.cached_route
        if mask is None or mask.shape[1] < length:
            mask = torch.ones(batch, length, device=states.device)
        route = self.route(self.router.pool(states, mask[:, -length:]))
        state.cached_route = route
        state.cached_ids = ids.detach().clone() if (seen and ids is not None) else None  # same length: checked above
        return route

    def _consume_call(self) -> tuple[bool, bool, torch.Tensor | None, torch.Tensor | None]:
        """What the pre-hook saw about this call, used once: a later call that bypasses the hook
        (e.g. the inner model called directly) must not inherit it."""
        state = self.routing
        seen = (state.call_seen, state.call_reuse, state.call_mask, state.call_ids)
        state.call_seen, state.call_reuse, state.call_mask, state.call_ids = False, False, None, None
        return seen

    def reset_routing_cache(self) -> None:
        self.routing.cached_route = None
        self.routing.cached_ids = None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)  # (B, T, d)
        if self.disabled or self.num_experts == 0:
            self._consume_call()
            self.routing.route_input = None
            return base_out
        route = self._route_for(x)
        out = base_out
        for expert_id in torch.unique(route.experts[route.experts >= 0]).tolist():
            rows, slots = (route.experts == expert_id).nonzero(as_tuple=True)
            contribution = self.experts[expert_id](x[rows].float())  # (n, T, d)
            contribution = contribution * route.gates[rows, slots].view(-1, 1, 1)
            out = out.index_add(0, rows, contribution.to(out.dtype))
        return out


def install_route_tap(route_ffn: nn.Module, layer: LEMoELayer) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on the route layer's FFN that hands its input to the adaptor further up."""
    layer.routes_elsewhere = True

    def tap(module: nn.Module, args: tuple[Any, ...]) -> None:
        layer.observe_route_input(args[0])

    return route_ffn.register_forward_pre_hook(tap)


def install_call_observer(model: nn.Module, layer: LEMoELayer) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on the whole model that tells the layer what each call carries.

    The layer only sees hidden states; the attention mask (which tokens are padding), the
    token ids (is this the same prompt again?) and the cache length (is this a decode step?)
    are only visible at the model's entry point.
    """

    def observe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = None
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values")
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        layer.observe_call(ids, mask if isinstance(mask, torch.Tensor) else None, past_len)

    return model.register_forward_pre_hook(observe, with_kwargs=True)
