"""Edit records and the reader for lemoe's own JSON / JSONL format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

_TEXT_FIELDS = ("prompt", "target", "rephrase", "locality_prompt", "locality_answer", "subject", "id")


class DataError(ValueError):
    """A malformed data file or record; the message names the file, the record and the field."""


@dataclass(frozen=True)
class EditRecord:
    """One fact correction: `prompt` should be completed by `target`.

    `rephrase` (generality) and `locality_prompt` / `locality_answer` (an unrelated question whose
    behaviour must not change) are optional and only used for evaluation, never for training.
    """

    prompt: str
    target: str
    rephrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"edit record field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"edit record has an empty {name!r} (record {self.id or self.prompt[:60]!r})")
        for name in ("rephrase", "locality_prompt", "locality_answer", "subject", "id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"edit record field {name!r} must be a string or null, got {type(value).__name__}")
        if (self.locality_prompt is None) != (self.locality_answer is None):
            raise DataError(
                f"edit record {self.id or self.prompt[:60]!r} has only one of locality_prompt / locality_answer"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["extra"]:
            del data["extra"]
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> "EditRecord":
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "prompt" not in data:
            raise DataError(f"{where}: missing field 'prompt'")
        if "target" not in data:
            raise DataError(f"{where}: missing field 'target'")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise DataError(f"{where}: field 'extra' must be an object")
        unknown = {k: v for k, v in data.items() if k not in _TEXT_FIELDS and k != "extra"}
        try:
            return cls(**{k: data.get(k) for k in _TEXT_FIELDS}, extra={**extra, **unknown})
        except DataError as err:
            raise DataError(f"{where}: {err}") from None


def read_edits(path: str | Path) -> list[EditRecord]:
    """Read a JSON list or JSONL file of records with lemoe's field names (prompt, target, ...)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    items: list[tuple[str, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        items = [(f"{path}: record {i}", item) for i, item in enumerate(loaded)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({err})") from None
    if not items:
        raise DataError(f"{path}: contains no edit records")
    return [EditRecord.from_dict(item, where) for where, item in items]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
