"""Edit records and the reader for lemoe's own JSON / JSONL format."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .probes import GENERATION, LOCALITY_KINDS, REPHRASE, Probe, ProbeError, answered, answers

_TEXT_FIELDS = ("prompt", "target", "rephrase", "locality_prompt", "locality_answer", "subject", "id", "target_true")


class DataError(ValueError):
    """A malformed data file or record; the message names the file, the record and the field."""


@dataclass(frozen=True)
class EditRecord:
    """One fact correction: `prompt` should be completed by `target`.

    Everything else is evaluation data, never used for training: `rephrase` and `locality_prompt` /
    `locality_answer` (the first rephrase and locality question, as every format has carried them),
    `probes` (every probe the data set carries, each with its kind: lemoe.probes), and `target_true`
    (the fact before the edit, where the data set names it).
    """

    prompt: str
    target: str
    rephrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None
    id: str | None = None
    target_true: str | None = None
    probes: tuple[Probe, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"edit record field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"edit record has an empty {name!r} (record {self.id or self.prompt[:60]!r})")
        for name in ("rephrase", "locality_prompt", "locality_answer", "subject", "id", "target_true"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"edit record field {name!r} must be a string or null, got {type(value).__name__}")
        if (self.locality_prompt is None) != (self.locality_answer is None):
            raise DataError(
                f"edit record {self.id or self.prompt[:60]!r} has only one of locality_prompt / locality_answer"
            )
        if not isinstance(self.probes, tuple) or not all(isinstance(p, Probe) for p in self.probes):
            raise DataError("edit record field 'probes' must be a tuple of Probe")

    def all_probes(self) -> tuple[Probe, ...]:
        """Every probe of this edit; a record without `probes` (older files, lemoe's own format) gets
        its rephrase and its locality question, the latter of kind `unrelated`."""
        if self.probes:
            return self.probes
        derived = []
        if self.rephrase is not None:
            derived.append(Probe(REPHRASE, self.rephrase, self.target))
        if self.locality_prompt is not None:
            derived.append(Probe("unrelated", self.locality_prompt, self.locality_answer))
        return tuple(derived)

    def probes_of(self, *kinds: str) -> list[Probe]:
        return [p for p in self.all_probes() if p.kind in kinds]

    def to_dict(self, probes: bool = True) -> dict[str, Any]:
        """The record as lemoe's JSON format; `probes=False` leaves the probe list out (what an
        adapter stores: evaluation data does not belong in it)."""
        data = {f: getattr(self, f) for f in _TEXT_FIELDS}
        if probes and self.probes:
            data["probes"] = [p.to_dict() for p in self.probes]
        if self.extra:
            data["extra"] = dict(self.extra)
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
        raw_probes = data.get("probes", [])
        if not isinstance(raw_probes, list):
            raise DataError(f"{where}: field 'probes' must be a list of probe objects")
        parsed = []
        for i, raw in enumerate(raw_probes):
            try:
                parsed.append(Probe.from_dict(raw))
            except ProbeError as err:
                raise DataError(f"{where}: probes[{i}]: {err}") from None
        unknown = {k: v for k, v in data.items() if k not in _TEXT_FIELDS and k not in ("extra", "probes")}
        try:
            return cls(**{k: data.get(k) for k in _TEXT_FIELDS}, probes=tuple(parsed), extra={**extra, **unknown})
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


ProbeSpec = tuple[str, str, Any, str]  # kind, prompt, answer(s) in any data set shape or None, field label


def _probe(spec: ProbeSpec, where: str) -> Probe | None:
    """The probe of a spec; None for an empty prompt (data noise that older readers accepted). A
    locality probe may lack an answer (metrics compare with the unedited model's own output)."""
    kind, prompt, value, label = spec
    if not prompt.strip():
        return None
    try:
        if value is None or _blank(value):  # no usable answer: a locality probe still compares with the
            return Probe(kind, prompt) if kind in LOCALITY_KINDS or kind == GENERATION else None  # unedited model
        return answered(kind, prompt, value, f"{where}: field {label!r}")
    except ProbeError as err:
        raise DataError(str(err)) from None


def _blank(value: Any) -> bool:
    """An answer that is there but empty ("", [], [[""]]): real files have a few."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(_blank(item) for item in value)
    return False


def _probe_list(record: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """The list under `key` (dotted for nesting); absent or null is empty, anything else not a list of
    objects is an error naming the field."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise DataError(f"{where}: field {key!r} must be a list of objects")
    return value


def _knowedit_probes(record: dict[str, Any], where: str) -> list[ProbeSpec]:
    """KnowEdit's locality (same subject, other relation: Relation_Specificity, Forgetfulness) and
    portability probes, every one, answers in any of the splits' shapes."""
    for key in ("locality", "portability"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise DataError(f"{where}: field {key!r} must be an object, got {type(record[key]).__name__}")
    groups = (("locality.Relation_Specificity", "same_subject"), ("locality.Forgetfulness", "same_subject"),
              ("portability.Subject_Aliasing", "subject_aliasing"), ("portability.Reasoning", "reasoning"),
              ("portability.Logical_Generalization", "logical_generalization"))
    specs = []
    for key, kind in groups:
        for i, item in enumerate(_probe_list(record, key, where)):
            prompt = _text(item, "prompt", f"{where} ({key}[{i}])")
            if "ground_truth" not in item:
                raise DataError(f"{where}: missing field '{key}[{i}].ground_truth'")
            specs.append((kind, prompt, item["ground_truth"], f"{key}[{i}].ground_truth"))
    return specs


def _legacy(probes: list[Probe], *kinds: str) -> tuple[str | None, str | None]:
    """(prompt, answer) of the first probe of these kinds: the single-probe fields older code reads."""
    first = next((p for p in probes if p.kind in kinds), None)
    return (first.prompt, first.answer) if first is not None else (None, None)


def _with_probes(where: str, specs: list[ProbeSpec], **fields: Any) -> EditRecord:
    """The record (its own fields checked first), its probes, and the single-probe fields older code reads."""
    base = _record(where, **fields)
    probes = [probe for spec in specs if (probe := _probe(spec, where)) is not None]
    rephrase, _ = _legacy(probes, REPHRASE)
    loc_prompt, loc_answer = _legacy([p for p in probes if p.is_locality and p.answer is not None], *LOCALITY_KINDS)
    return dataclasses.replace(base, rephrase=rephrase, locality_prompt=loc_prompt, locality_answer=loc_answer,
                               probes=tuple(probes))


def _optional_answers(record: dict[str, Any], key: str, where: str) -> str | None:
    if record.get(key) is None or _blank(record[key]):
        return None
    try:
        return answers(record[key], f"{where}: field {key!r}")[0]
    except ProbeError as err:
        raise DataError(str(err)) from None


def _from_lemoe(r: dict[str, Any], where: str) -> EditRecord:
    return EditRecord.from_dict(r, where)


def _from_mend_zsre(r: dict[str, Any], where: str) -> EditRecord:
    target = _text(r, "alt", where)
    probes: list[ProbeSpec] = []
    if (rephrase := _optional_text(r, "rephrase", where)) is not None:
        probes.append((REPHRASE, rephrase, target, "alt"))
    if (loc := _optional_text(r, "loc", where)) is not None:
        probes.append(("unrelated", loc, _text(r, "loc_ans", where), "loc_ans"))
    return _with_probes(where, probes, prompt=_text(r, "src", where), target=target,
                        subject=_optional_text(r, "subject", where))


def _from_knowedit(r: dict[str, Any], where: str) -> EditRecord:
    target = _text(r, "target_new", where)
    probes: list[ProbeSpec] = []
    if (rephrase := _optional_text(r, "rephrase_prompt", where)) is not None:
        probes.append((REPHRASE, rephrase, target, "target_new"))
    probes.extend(_knowedit_probes(r, where))
    return _with_probes(where, probes, prompt=_text(r, "prompt", where), target=target,
                        subject=_optional_text(r, "subject", where), target_true=_optional_answers(r, "ground_truth", where))


def _from_knowedit_wikibio(r: dict[str, Any], where: str) -> EditRecord:
    return _with_probes(where, _knowedit_probes(r, where), prompt=_text(r, "text", where),
                        target=_text(r, "labels", where), subject=_optional_text(r, "concept", where))


def _from_easyedit_counterfact(r: dict[str, Any], where: str) -> EditRecord:
    target = _text(r, "target_new", where)
    true = _optional_answers(r, "ground_truth", where)
    probes: list[ProbeSpec] = []
    if (rephrase := _optional_text(r, "rephrase_prompt", where)) is not None:
        probes.append((REPHRASE, rephrase, target, "target_new"))
    if (neighbour := _optional_text(r, "locality_prompt", where)) is not None:
        # a neighbourhood prompt (same relation, other subject); its answer is its own ground truth when
        # the file gives one, else the edited fact's true object, which CounterFact's neighbours share
        key = "locality_ground_truth" if r.get("locality_ground_truth") is not None else "ground_truth"
        probes.append(("neighbour", neighbour, r.get(key), key))
    ident = r.get("case_id", r.get("id"))
    return _with_probes(where, probes, prompt=_text(r, "prompt", where), target=target,
                        subject=_optional_text(r, "subject", where), target_true=true,
                        id=str(ident) if isinstance(ident, (int, str)) else None)


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
    probes: list[ProbeSpec] = [(REPHRASE, p, target, "requested_rewrite.target_new") for p in paraphrases]
    probes += [("neighbour", p, true, "requested_rewrite.target_true") for p in neighbours]
    probes += [(GENERATION, p, None, "") for p in dict.fromkeys(_list_of_text(r, "generation_prompts", where))]
    if r.get("portability") is not None:  # the one-hop question of EasyEdit's portability release
        hop = _object(r, "portability", where)
        question = _text(hop, "New Question", f"{where} (portability)")
        probes.append(("one_hop", question, _text(hop, "New Answer", f"{where} (portability)"),
                       "portability.New Answer"))
    return _with_probes(where, probes, prompt=template.replace("{}", subject), target=target, subject=subject,
                        target_true=true,
                        id=str(r["case_id"]) if isinstance(r.get("case_id"), (int, str)) else None,
                        extra={"paraphrase_prompts": paraphrases, "neighborhood_prompts": neighbours,
                               "target_true": true})


def _from_wise(r: dict[str, Any], where: str) -> EditRecord:
    target = _text(r, "target_new", where)
    probes: list[ProbeSpec] = []
    rephrase = _optional_text(r, "ood_rephrase", where) or _optional_text(r, "rephrase_prompt", where)
    if rephrase is not None:
        probes.append((REPHRASE, rephrase, target, "target_new"))
    if (loc := _optional_text(r, "locality_prompt", where)) is not None:
        probes.append(("unrelated", loc, _text(r, "locality_ground_truth", where), "locality_ground_truth"))
    return _with_probes(where, probes, prompt=_text(r, "prompt", where), target=target,
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
    DataFormat("easyedit-counterfact", "flat EasyEdit CounterFact: prompt, target_new, ground_truth, "
               "rephrase_prompt, locality_prompt", frozenset({"prompt", "target_new", "ground_truth"}),
               _from_easyedit_counterfact),
    DataFormat("wise", "WISE hallucination / temporal: prompt, target_new, locality_prompt, locality_ground_truth",
               frozenset({"prompt", "target_new", "locality_ground_truth"}), _from_wise),
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
    return [record for _, record in read_placed_edits(path, format)]


def conflicting_duplicates(placed: Sequence[tuple[str, EditRecord]]) -> list[tuple[str, str, str]]:
    """(first place, later place, prompt) of each record whose prompt an earlier record gave another target:
    the later edit would silently overrule (or mix with) the earlier one."""
    first: dict[str, tuple[str, str]] = {}
    found = []
    for where, record in placed:
        seen = first.setdefault(record.prompt, (where, record.target))
        if seen[1] != record.target:
            found.append((seen[0], where, record.prompt))
    return found


def read_placed_edits(path: str | Path, format: str | None = None) -> list[tuple[str, EditRecord]]:
    """`read_edits`, each record with its place in the file ("FILE: record N" or "FILE: line N")."""
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
    records: list[tuple[str, EditRecord]] = []
    for where, item in items:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = sorted(fmt.required - item.keys())
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (file read as {fmt.name} format)")
        records.append((where, fmt.convert(item, where)))
    return records
