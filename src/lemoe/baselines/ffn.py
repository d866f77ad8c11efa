"""The two halves of a known FFN: input projections + activation (the hidden `h`), and the output projection.

Baselines that change or route on the output projection (FT-L, WISE) need `h` itself, which
the FFN module does not expose; `FFNParts` computes it from the same submodules, so any
family in `models.LAYOUTS` works.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import FFNLayout


class FFNParts:
    """Calls the submodules of a base FFN: `hidden(x)` = act(gate(x)) * up(x) (or act(up(x))), `out(h)`."""

    def __init__(self, base: nn.Module, layout: FFNLayout) -> None:
        self.base, self.layout = base, layout
        self.in_projs = [getattr(base, name) for name in layout.in_projs]
        self.out_proj = getattr(base, layout.out_proj)
        self.act = getattr(base, layout.act_attr)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.in_projs) == 2:
            gate, up = self.in_projs
            return self.act(gate(x)) * up(x)
        return self.act(self.in_projs[0](x))

    def out(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_proj(h)

    def out_shape(self) -> tuple[int, int]:
        """(d_model, d_ff) of the output projection, whatever its storage order (GPT-2 Conv1D is (in, out))."""
        weight = self.out_proj.weight
        return (int(weight.shape[1]), int(weight.shape[0])) if self.layout.conv1d else tuple(weight.shape)  # type: ignore[return-value]
