"""lemoe: lifelong editing of causal language models with a Mixture-of-Experts adaptor (LEMoE)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.11.0"

# Public names are imported on first use (PEP 562), so `lemoe --help` and Ctrl-C at start-up stay
# instant: torch and transformers load only when a command needs them.
_EXPORTS = {
    "AdapterError": "persistence",
    "DataError": "data",
    "EditRecord": "data",
    "EditReport": "editor",
    "LEMoEConfig": "config",
    "LifelongEditor": "editor",
    "load_model": "models",
    "read_edits": "data",
}

if TYPE_CHECKING:
    from .config import LEMoEConfig
    from .data import DataError, EditRecord, read_edits
    from .editor import EditReport, LifelongEditor
    from .models import load_model
    from .persistence import AdapterError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lemoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AdapterError",
    "DataError",
    "EditRecord",
    "EditReport",
    "LEMoEConfig",
    "LifelongEditor",
    "__version__",
    "load_model",
    "read_edits",
]
