"""Edit records and the reader for lemoe's own JSON / JSONL format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

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


# ----------------------------------------------------------------------------- public formats
#
# Every format is one row in FORMATS: a name, a test on a record's keys, and a converter to
# EditRecord. Converters read fields through the accessors below, so a malformed record always
# raises DataError naming the record and the field (never a KeyError or TypeError).


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_text(record: dict[str, Any], key: str, where: str) -> str | None:
    return _text(record, key, where) if record.get(key) is not None else None


def _first_text(value: Any, where: str, key: str) -> str:
    """A string, or the first string of a non-empty list of strings (KnowEdit's ground_truth)."""
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: field {key!r} is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string or a list of strings, got {type(value).__name__}")
    return value


def _object(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = record.get(key)
    if not isinstance(value, dict):
        raise DataError(f"{where}: field {key!r} must be an object, got {type(value).__name__}")
    return value


def _list_of_text(record: dict[str, Any], key: str, where: str) -> list[str]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings")
    return value


def _record(where: str, **fields: Any) -> EditRecord:
    try:
        return EditRecord(**fields)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _knowedit_locality(record: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """First Relation_Specificity question of a KnowEdit record: same subject, another relation."""
    if record.get("locality") is None:
        return None, None
    locality = _object(record, "locality", where)
    items = locality.get("Relation_Specificity") or []
    if not isinstance(items, list):
        raise DataError(f"{where}: field 'locality.Relation_Specificity' must be a list")
    if not items:
        return None, None
    first = items[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}: field 'locality.Relation_Specificity[0]' must be an object")
    key = "locality.Relation_Specificity[0]"
    return _text(first, "prompt", f"{where} ({key})"), _first_text(first.get("ground_truth"), where, f"{key}.ground_truth")


def _from_lemoe(r: dict[str, Any], where: str) -> EditRecord:
    return EditRecord.from_dict(r, where)


def _from_mend_zsre(r: dict[str, Any], where: str) -> EditRecord:
    return _record(where, prompt=_text(r, "src", where), target=_text(r, "alt", where),
                   rephrase=_optional_text(r, "rephrase", where), locality_prompt=_optional_text(r, "loc", where),
                   locality_answer=_optional_text(r, "loc_ans", where), subject=_optional_text(r, "subject", where))


def _from_knowedit(r: dict[str, Any], where: str) -> EditRecord:
    loc_prompt, loc_answer = _knowedit_locality(r, where)
    return _record(where, prompt=_text(r, "prompt", where), target=_text(r, "target_new", where),
                   rephrase=_optional_text(r, "rephrase_prompt", where), locality_prompt=loc_prompt,
                   locality_answer=loc_answer, subject=_optional_text(r, "subject", where))


def _from_knowedit_wikibio(r: dict[str, Any], where: str) -> EditRecord:
    loc_prompt, loc_answer = _knowedit_locality(r, where)
    return _record(where, prompt=_text(r, "text", where), target=_text(r, "labels", where),
                   locality_prompt=loc_prompt, locality_answer=loc_answer, subject=_optional_text(r, "concept", where))


def _from_easyedit_counterfact(r: dict[str, Any], where: str) -> EditRecord:
    # the neighbourhood prompt shares the edited fact's true object, so its answer is ground_truth
    loc_prompt = _optional_text(r, "locality_prompt", where)
    loc_answer = _first_text(r.get("ground_truth"), where, "ground_truth") if loc_prompt is not None else None
    return _record(where, prompt=_text(r, "prompt", where), target=_text(r, "target_new", where),
                   rephrase=_optional_text(r, "rephrase_prompt", where), locality_prompt=loc_prompt,
                   locality_answer=loc_answer, subject=_optional_text(r, "subject", where),
                   id=str(r["id"]) if isinstance(r.get("id"), (int, str)) else None)


def _from_rome_counterfact(r: dict[str, Any], where: str) -> EditRecord:
    rewrite = _object(r, "requested_rewrite", where)
    inner = f"{where} (requested_rewrite)"
    template, subject = _text(rewrite, "prompt", inner), _text(rewrite, "subject", inner)
    if template.count("{}") != 1:
        raise DataError(f"{inner}: field 'prompt' must contain exactly one '{{}}' for the subject, got {template!r}")
    target = _text(_object(rewrite, "target_new", inner), "str", f"{inner} (target_new)")
    true = _text(_object(rewrite, "target_true", inner), "str", f"{inner} (target_true)")
    paraphrases = _list_of_text(r, "paraphrase_prompts", where)
    neighbours = _list_of_text(r, "neighborhood_prompts", where)
    return _record(where, prompt=template.replace("{}", subject), target=target,
                   rephrase=paraphrases[0] if paraphrases else None,
                   locality_prompt=neighbours[0] if neighbours else None, locality_answer=true if neighbours else None,
                   subject=subject, id=str(r["case_id"]) if isinstance(r.get("case_id"), (int, str)) else None,
                   extra={"paraphrase_prompts": paraphrases, "neighborhood_prompts": neighbours, "target_true": true})


def _from_wise(r: dict[str, Any], where: str) -> EditRecord:
    return _record(where, prompt=_text(r, "prompt", where), target=_text(r, "target_new", where),
                   rephrase=_optional_text(r, "ood_rephrase", where) or _optional_text(r, "rephrase_prompt", where),
                   locality_prompt=_optional_text(r, "locality_prompt", where),
                   locality_answer=_optional_text(r, "locality_ground_truth", where),
                   subject=_optional_text(r, "subject", where))


@dataclass(frozen=True)
class DataFormat:
    name: str
    description: str
    required: frozenset[str]  # keys whose presence identifies the format
    convert: Callable[[dict[str, Any], str], EditRecord]


FORMATS: tuple[DataFormat, ...] = (
    DataFormat("mend-zsre", "MEND/WISE ZsRE: src, alt, rephrase, loc, loc_ans", frozenset({"src", "alt"}),
               _from_mend_zsre),
    DataFormat("rome-counterfact", "ROME CounterFact: requested_rewrite with a {} template",
               frozenset({"requested_rewrite"}), _from_rome_counterfact),
    DataFormat("knowedit-wikibio", "KnowEdit WikiBio: text, labels, concept, locality",
               frozenset({"text", "labels"}), _from_knowedit_wikibio),
    DataFormat("knowedit", "KnowEdit ZsRE: prompt, target_new, rephrase_prompt, locality{Relation_Specificity}",
               frozenset({"prompt", "target_new", "locality"}), _from_knowedit),
    DataFormat("wise", "WISE hallucination / temporal: prompt, target_new, locality_prompt, locality_ground_truth",
               frozenset({"prompt", "target_new", "locality_ground_truth"}), _from_wise),
    DataFormat("easyedit-counterfact", "flat EasyEdit CounterFact: prompt, target_new, ground_truth, "
               "rephrase_prompt, locality_prompt", frozenset({"prompt", "target_new", "ground_truth"}),
               _from_easyedit_counterfact),
    DataFormat("lemoe", "lemoe's own: prompt, target, rephrase, locality_prompt, locality_answer",
               frozenset({"prompt", "target"}), _from_lemoe),
)


def detect_format(record: Any, where: str = "record") -> DataFormat:
    """The first format whose identifying keys the record has."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for fmt in FORMATS:
        if fmt.required <= record.keys():
            return fmt
    closest = max(FORMATS, key=lambda f: len(f.required & record.keys()))
    if closest.required & record.keys():
        missing = sorted(closest.required - record.keys())[0]
        raise DataError(f"{where}: missing field {missing!r} (closest format: {closest.name}, {closest.description})")
    known = "; ".join(f"{f.name} ({', '.join(sorted(f.required))})" for f in FORMATS)
    raise DataError(f"{where}: unknown record format with keys {sorted(map(str, record))[:12]}; known formats: {known}")


def _load_items(path: Path) -> list[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(loaded, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return [(f"{path}: record {i}", item) for i, item in enumerate(loaded)]
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}: line {lineno}", json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({err})") from None
    return items


def read_edits(path: str | Path, format: str | None = None) -> list[EditRecord]:
    """Read edit records from a JSON list or JSONL file in any known format (detected from the first
    record unless `format` names one); every record must be of that format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items = _load_items(path)
    if not items:
        raise DataError(f"{path}: contains no edit records")
    if format is None:
        fmt = detect_format(items[0][1], items[0][0])
    else:
        by_name = {f.name: f for f in FORMATS}
        if format not in by_name:
            raise DataError(f"unknown format {format!r}; known: {', '.join(by_name)}")
        fmt = by_name[format]
    records = []
    for where, item in items:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = sorted(fmt.required - item.keys())
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (file read as {fmt.name} format)")
        records.append(fmt.convert(item, where))
    return records
