"""The adapter directory: PEFT-like files, written so that a kill mid-save loses nothing committed.

    adapter_config.json        config, base model identity + weight fingerprint, versions (readable view)
    adapter_model.safetensors  adaptor tensors only; its metadata holds the full state (the commit point)
    edits.jsonl                every edit with its batch and expert (readable view)
    README.md                  a short model card

`adapter_model.safetensors` is replaced atomically (temporary file, fsync, rename) and carries
the config and the edits in its metadata, so it alone defines the saved state; the metadata also holds a
digest of every tensor and of the state (lemoe.integrity), checked on every load. The other files are
rewritten after it; if a kill leaves them stale, the next command that writes repairs them from the
metadata (`repair_views`). Reading never writes: an adapter on a read-only disk loads.
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

from .integrity import digest_mismatch, finite_number, non_finite, tensor_digests, text_digest

logger = logging.getLogger("lemoe")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EDITS_NAME = "edits.jsonl"
CARD_NAME = "README.md"
FORMAT_NAME = "lemoe-adapter"
FORMAT_VERSION = 3
MAX_EXPERTS = 1_000_000  # a bound checked before anything is allocated
_NAMES = (CONFIG_NAME, WEIGHTS_NAME, EDITS_NAME, CARD_NAME)


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
    """Write the adapter directory; refuses non-finite tensors (a diverged expert is never saved)."""
    directory = Path(directory)
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"refusing to save: tensor {bad[0]!r} holds NaN or infinity")
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    state_json = json.dumps({**state.header(), "edits": state.edits}, sort_keys=True, ensure_ascii=False)
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(state.format_version),
        "state": state_json,
        "state_digest": text_digest(state_json),
        "digests": json.dumps(tensor_digests(contiguous), sort_keys=True),
    }
    _atomic_write_bytes(directory / WEIGHTS_NAME, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
    _write_views(directory, state)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files a killed save left behind (`.NAME.*.tmp` beside our own files)."""
    stale = [p for name in _NAMES for p in directory.glob(f".{name}.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        logger.info("removed a temporary file left by an interrupted save: %s", path)
    return stale


def _write_views(directory: Path, state: AdapterState) -> None:
    _atomic_write_text(directory / CONFIG_NAME, json.dumps(state.header(), sort_keys=True, indent=2) + "\n")
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in state.edits)
    _atomic_write_text(directory / EDITS_NAME, lines)
    _atomic_write_text(directory / CARD_NAME, model_card(state))


def has_adapter(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_NAME).is_file()


def lemoe_files_without_weights(directory: str | Path) -> list[str]:
    """The lemoe files in `directory` when its weights file is missing (a partial copy or sync): such a
    directory is not an adapter we can load, and not an empty place to start a new one."""
    directory = Path(directory)
    if not directory.is_dir() or has_adapter(directory):
        return []
    return [name for name in (CONFIG_NAME, EDITS_NAME) if (directory / name).exists()]


def stored_digests(directory: str | Path) -> dict[str, Any] | None:
    """The tensor digests stored in an adapter's weights file; None for adapters saved before lemoe 0.6."""
    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as handle:
        text = (handle.metadata() or {}).get("digests")
    return json.loads(text) if text else None


def check_expert_count(tensors: dict[str, torch.Tensor], num_experts: int, where: str | Path) -> None:
    """The weights file holds experts 0..num_experts-1 exactly, as the metadata claims."""
    stored = {name.split(".")[1] for name in tensors if name.startswith("experts.")}
    if stored != {str(i) for i in range(num_experts)}:
        raise AdapterError(f"{where}: metadata claims {num_experts} experts; the weights file holds {len(stored)}")


def load_adapter(directory: str | Path) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    """Read and check an adapter directory (digests, finite values, metadata schema); never writes."""
    return _read_adapter(Path(directory), with_tensors=True)


def repair_views(directory: str | Path, state: AdapterState) -> bool:
    """Rewrite adapter_config.json / edits.jsonl / README.md when a killed save left them stale (writers
    only); True when something was repaired."""
    directory = Path(directory)
    remove_stale_temporaries(directory)
    if not _views_stale(directory, state):
        return False
    logger.warning("%s: adapter_config.json / edits.jsonl were out of date (interrupted save); rewritten", directory)
    _write_views(directory, state)
    return True


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
    text = metadata.get("state")
    if not isinstance(text, str):
        raise AdapterError(f"{weights}: unreadable lemoe metadata (no state)")
    if "state_digest" in metadata and metadata["state_digest"] != text_digest(text):
        raise AdapterError(f"{weights}: the metadata does not match its stored digest (the file was changed)")
    try:
        version = int(metadata.get("format_version", "0"))
        raw = json.loads(text)
    except (KeyError, ValueError) as err:
        raise AdapterError(f"{weights}: unreadable lemoe metadata ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{weights}: lemoe metadata must be a JSON object, got {type(raw).__name__}")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{directory}: adapter format version {version} was written by a newer lemoe "
            f"({raw.get('lemoe_version')}); this lemoe reads up to version {FORMAT_VERSION}. Upgrade lemoe."
        )
    state = _state_from(raw, version, weights)
    if with_tensors:
        _check_tensors(tensors, metadata, weights)
    return state, tensors


def _check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], weights: Path) -> None:
    if "digests" in metadata:
        try:
            digests = json.loads(metadata["digests"])
        except ValueError:
            digests = None
        if not isinstance(digests, dict):
            raise AdapterError(f"{weights}: unreadable tensor digests in the metadata")
        problem = digest_mismatch(tensors, digests)
        if problem:
            raise AdapterError(f"{weights}: {problem}")
    else:
        logger.warning("%s has no tensor digests (saved by lemoe < 0.6): damage to its weights cannot be "
                       "detected; add them with `lemoe info --verify --add-digests %s`", weights, weights.parent)
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"{weights}: tensor {bad[0]!r} holds NaN or infinity")


def _state_from(raw: dict[str, Any], version: int, weights: Path) -> AdapterState:
    """The metadata, checked field by field before anything is allocated from it."""
    def bad(field: str, wanted: str) -> AdapterError:
        return AdapterError(f"{weights}: metadata field {field!r} must be {wanted}, got {raw.get(field)!r:.80}")

    def is_int(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    for field in ("config", "base_model"):
        if not isinstance(raw.get(field), dict):
            raise bad(field, "a JSON object")
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, list) or not all(finite_number(v) for v in fingerprint):
        raise bad("fingerprint", "a list of finite numbers")
    if not is_int(raw.get("layer"), 0, 100_000):
        raise bad("layer", "a layer index (int >= 0)")
    if not is_int(raw.get("num_experts"), 0, MAX_EXPERTS):
        raise bad("num_experts", f"an int in [0, {MAX_EXPERTS}]")
    for field in ("lemoe_version", "method"):
        if not isinstance(raw.get(field, "lemoe"), str):
            raise bad(field, "a string")
    edits = raw.get("edits")
    if not isinstance(edits, list):
        raise bad("edits", "a list of edits")
    for i, edit in enumerate(edits):
        problem = _edit_problem(edit, raw["num_experts"], raw.get("method", "lemoe") == "lemoe")
        if problem:
            raise AdapterError(f"{weights}: metadata edit {i}: {problem}")
    if version < 2 and "route_layer" not in raw["config"]:
        raw["config"]["route_layer"] = raw["layer"]  # format 1 routed from the adaptor's own layer
    if version < 3 and raw.get("method", "lemoe") == "lemoe":
        raw["config"].setdefault("key", "pooled")  # formats 1-2 routed on one pooled vector per prompt
        raw["config"].setdefault("pooling", "mean")
        raw["config"].setdefault("continuation_tokens", 0)
    if raw.get("method", "lemoe") == "lemoe":
        raw["config"].setdefault("chat_rows", False)  # saved before lemoe 0.7 made it the default
        raw["config"].setdefault("prefix_rows", 0)  # saved before lemoe 0.9 had them
        raw["config"].setdefault("train_precision", "float32")  # saved before lemoe 0.10 had it
        raw["config"].setdefault("stop_confidence", 0.0)  # saved before lemoe 0.11 had it
    return AdapterState(
        config=raw["config"], base_model=raw["base_model"], fingerprint=fingerprint, layer=raw["layer"],
        num_experts=raw["num_experts"], edits=edits, lemoe_version=str(raw.get("lemoe_version", "")),
        format_version=version, method=raw.get("method", "lemoe"),
    )


def _edit_problem(edit: Any, num_experts: int, routed: bool) -> str | None:
    if not isinstance(edit, dict):
        return f"must be a JSON object, got {type(edit).__name__}"
    for field in ("prompt", "target"):
        if not isinstance(edit.get(field), str):
            return f"{field!r} must be a string, got {edit.get(field)!r:.60}"
    for field in ("batch", "expert"):
        value = edit.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{field!r} must be an int >= 0, got {value!r:.60}"
    if routed and edit["expert"] >= num_experts:
        return f"expert {edit['expert']} does not exist (the adapter holds {num_experts})"
    return None


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
