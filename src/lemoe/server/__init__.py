"""`lemoe serve`: an edited model behind an OpenAI-compatible HTTP API, edited live (extra `lemoe[serve]`)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from ..config import LEMoEConfig
from ..editor import LifelongEditor
from ..persistence import AdapterError, has_adapter, read_adapter_state
from .app import create_app
from .schemas import Limits
from .service import ServedModel

logger = logging.getLogger("lemoe")

__all__ = ["Limits", "ServedModel", "adapter_model_name", "create_app", "is_loopback", "serve_model"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_model(model: Any, tokenizer: Any, adapter_dir: str | Path, name: str, follow: bool = False,
                config: LEMoEConfig | None = None) -> ServedModel:
    """The adapter in `adapter_dir` on `model`: loaded if it exists (refused if made for another model), else
    started empty there (the directory appears with the first edit). `follow`: read-only, reloaded on change."""
    directory = Path(adapter_dir)
    if follow:
        if not has_adapter(directory):
            raise AdapterError(f"{directory}: --follow needs an existing adapter (start the writer first)")
        editor = LifelongEditor.load(model, tokenizer, directory)
    else:
        editor = LifelongEditor.open(model, tokenizer, directory, config)
    served = ServedModel(model, tokenizer, editor, directory, name, read_only=follow)
    if follow:
        served.follow()
    return served


def adapter_model_name(adapter_dir: str | Path) -> str | None:
    """The base model an existing adapter was made for (None when the directory holds none yet)."""
    if not has_adapter(adapter_dir):
        return None
    return read_adapter_state(adapter_dir).base_model.get("name_or_path") or None
