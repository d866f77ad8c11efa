"""The adapter directory: PEFT-like files, written so that a kill mid-save loses nothing committed.

    adapter_config.json        config, base model identity + weight fingerprint, versions (readable view)
    adapter_model.safetensors  adaptor tensors only; its metadata holds the full state (the commit point)
    edits.jsonl                every edit with its batch and expert (readable view)
    README.md                  a short model card

`adapter_model.safetensors` is replaced atomically (temporary file, fsync, rename) and carries
the config and the edits in its metadata, so it alone defines the saved state. The other files
are rewritten after it; if a kill leaves them stale, loading repairs them from the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("lemoe")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EDITS_NAME = "edits.jsonl"
CARD_NAME = "README.md"
FORMAT_NAME = "lemoe-adapter"
FORMAT_VERSION = 3


class AdapterError(ValueError):
    """An adapter directory that cannot be used: missing, corrupted, newer, or for another model."""


@dataclass
class AdapterState:
    """Everything an adapter directory holds besides tensors."""

    config: dict[str, Any]
    base_model: dict[str, Any]
    fingerprint: list[float]
    layer: int
    num_experts: int
    edits: list[dict[str, Any]]
    lemoe_version: str
    format_version: int = FORMAT_VERSION
    method: str = "lemoe"  # or a baseline's name (lemoe.baselines): which editor class can load it

    def header(self) -> dict[str, Any]:
        """adapter_config.json: the state without the edit list."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "lemoe_version": self.lemoe_version,
            "peft_type": "LEMOE",
            "method": self.method,
            "config": self.config,
            "base_model": self.base_model,
            "base_model_name_or_path": self.base_model.get("name_or_path", ""),
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "num_experts": self.num_experts,
            "num_edits": len(self.edits),
        }


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_adapter(directory: str | Path, state: AdapterState, tensors: dict[str, torch.Tensor]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(state.format_version),
        "state": json.dumps(
            {**state.header(), "edits": state.edits}, sort_keys=True, ensure_ascii=False
        ),
    }
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_write_bytes(directory / WEIGHTS_NAME, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
    _write_views(directory, state)


def _write_views(directory: Path, state: AdapterState) -> None:
    _atomic_write_text(directory / CONFIG_NAME, json.dumps(state.header(), sort_keys=True, indent=2) + "\n")
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in state.edits)
    _atomic_write_text(directory / EDITS_NAME, lines)
    _atomic_write_text(directory / CARD_NAME, model_card(state))


def has_adapter(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_NAME).is_file()


def load_adapter(directory: str | Path) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    """Read and check an adapter directory; repair stale readable views from the weights' metadata."""
    return _read_adapter(Path(directory), with_tensors=True)


def read_adapter_state(directory: str | Path) -> AdapterState:
    """The checked state of an adapter directory without reading its tensors (e.g. to find its base model)."""
    return _read_adapter(Path(directory), with_tensors=False)[0]


def _read_adapter(directory: Path, with_tensors: bool) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    weights = directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    if not weights.is_file():
        raise AdapterError(f"{directory}: not a lemoe adapter directory (no {WEIGHTS_NAME})")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except Exception as err:  # safetensors raises its own error types for truncated headers and data
        raise AdapterError(f"{weights}: corrupted or truncated safetensors file ({err})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterError(f"{weights}: not written by lemoe (metadata format {metadata.get('format')!r})")
    try:
        version = int(metadata.get("format_version", "0"))
        raw = json.loads(metadata["state"])
    except (KeyError, ValueError) as err:
        raise AdapterError(f"{weights}: unreadable lemoe metadata ({err})") from None
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{directory}: adapter format version {version} was written by a newer lemoe "
            f"({raw.get('lemoe_version')}); this lemoe reads up to version {FORMAT_VERSION}. Upgrade lemoe."
        )
    if version < 2 and isinstance(raw.get("config"), dict) and "route_layer" not in raw["config"]:
        raw["config"]["route_layer"] = raw.get("layer")  # format 1 routed from the adaptor's own layer
    if version < 3 and isinstance(raw.get("config"), dict) and raw.get("method", "lemoe") == "lemoe":
        raw["config"].setdefault("key", "pooled")  # formats 1-2 routed on one pooled vector per prompt
        raw["config"].setdefault("pooling", "mean")
        raw["config"].setdefault("continuation_tokens", 0)
    state = AdapterState(
        config=raw["config"], base_model=raw["base_model"], fingerprint=raw["fingerprint"], layer=raw["layer"],
        num_experts=raw["num_experts"], edits=raw["edits"], lemoe_version=raw["lemoe_version"], format_version=version,
        method=raw.get("method", "lemoe"),
    )
    if _views_stale(directory, state):
        logger.warning("%s: adapter_config.json / edits.jsonl were out of date (interrupted save); rewriting", directory)
        _write_views(directory, state)
    return state, tensors


def _views_stale(directory: Path, state: AdapterState) -> bool:
    try:
        header = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        edit_lines = (directory / EDITS_NAME).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return True
    return header != json.loads(json.dumps(state.header())) or len(edit_lines) != len(state.edits)


def model_card(state: AdapterState) -> str:
    cfg = state.config
    if state.method != "lemoe":
        return (
            f"# {state.method} baseline editor state\n\n"
            f"Made with lemoe {state.lemoe_version} for `{state.base_model.get('name_or_path')}`: "
            f"{len(state.edits)} edits at decoder layer {state.layer}.\n\n"
            "```python\nfrom lemoe import load_model\nfrom lemoe.baselines import load_editor\n"
            f"model, tok = load_model({state.base_model.get('name_or_path')!r})\n"
            "editor = load_editor(model, tok, 'THIS_DIRECTORY')\n```\n"
        )
    return (
        "# LEMoE adapter\n\n"
        f"Lifelong-editing adapter made with lemoe {state.lemoe_version} for `{state.base_model.get('name_or_path')}` "
        f"({state.base_model.get('architecture')}).\n\n"
        f"- edits: {len(state.edits)} in {state.num_experts} expert(s) at decoder layer {state.layer}\n"
        f"- expert kind: {cfg.get('expert')}, top-k {cfg.get('top_k')}, deferral {cfg.get('deferral')}\n\n"
        "Load it with:\n\n"
        "```python\nfrom lemoe import LifelongEditor, load_model\n"
        f"model, tok = load_model({state.base_model.get('name_or_path')!r})\n"
        "editor = LifelongEditor.load(model, tok, 'THIS_DIRECTORY')\n```\n\n"
        "`edits.jsonl` lists every edit with its batch and expert.\n"
    )
