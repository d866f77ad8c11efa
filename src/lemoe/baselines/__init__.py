"""Baseline editors behind LifelongEditor's interface, for side-by-side comparison in `lemoe bench`.

    ft-l   fine-tune layer L's FFN output projection on every batch (naive lifelong fine-tuning)
    memoe  MoE adaptor with a learned linear gate, all experts trained on every batch
    grace  GRACE: codebook of keys with deferral radii at layer L
    wise   WISE: side memory of the FFN output projection, activation router, knowledge shards
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..persistence import AdapterError, read_adapter_state
from .base import BaselineEditor, MethodConfig
from .ft_l import FTLConfig, FTLEditor
from .grace import GRACEConfig, GRACEEditor
from .memoe import MEMoEConfig, MEMoEEditor
from .wise import WISEConfig, WISEEditor

BASELINES: dict[str, type[BaselineEditor]] = {
    cls.method: cls for cls in (FTLEditor, MEMoEEditor, GRACEEditor, WISEEditor)
}
METHODS = ("lemoe", *BASELINES)


def make_editor(method: str, model: nn.Module, tokenizer: Any, config: Any = None) -> Any:
    """An editor for `method` ('lemoe' or a baseline name) on `model`; `config` of the method's own class."""
    if method == "lemoe":
        from ..editor import LifelongEditor

        return LifelongEditor(model, tokenizer, config)
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return BASELINES[method](model, tokenizer, config)


def load_editor(model: nn.Module, tokenizer: Any, directory: str | Path) -> Any:
    """Load any saved editor state (LEMoE adapter or baseline), choosing the class from its `method`."""
    method = read_adapter_state(directory).method
    if method == "lemoe":
        from ..editor import LifelongEditor

        return LifelongEditor.load(model, tokenizer, directory)
    if method not in BASELINES:
        raise AdapterError(f"{directory}: saved by unknown method {method!r}")
    return BASELINES[method].load(model, tokenizer, directory)


__all__ = ["BASELINES", "METHODS", "BaselineEditor", "FTLConfig", "FTLEditor", "GRACEConfig", "GRACEEditor",
           "MEMoEConfig", "MEMoEEditor", "MethodConfig", "WISEConfig", "WISEEditor", "load_editor", "make_editor"]
