"""Readers of every public format in ../shared/data, and their errors on malformed input."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from lemoe import DataError, EditRecord, read_edits
from lemoe.data import FORMATS, detect_format

REAL_FILES = {
    "zsre/zsre_mend_dev.json": "mend-zsre",
    "zsre/knowedit_zsre_test.json": "knowedit",
    "counterfact/counterfact_500_easyedit.json": "easyedit-counterfact",
    "counterfact/counterfact_rome_format_275.json": "rome-counterfact",
    "hallucination/hallucination-edit.json": "wise",
    "hallucination/hallucination-train.json": "wise",
    "temporal/temporal-edit.json": "wise",
    "wikibio/knowedit_wikibio_test.json": "knowedit-wikibio",
    "counterfact/counterfact_easyedit_train.json": "easyedit-counterfact",
    "counterfact/counterfact_rome_format_dev.json": "rome-counterfact",
    "knowedit/knowedit_wiki_counterfact_train.json": "knowedit",
    "knowedit/knowedit_wiki_recent_train.json": "knowedit",
}


def _few(name: str, n: int = 5) -> list[dict]:
    return json.loads((SHARED_DATA / name).read_text())[:n]


@pytest.mark.parametrize(("name", "fmt"), sorted(REAL_FILES.items()))
def test_every_real_file_reads_completely(name, fmt):
    raw = json.loads((SHARED_DATA / name).read_text())
    assert detect_format(raw[0]).name == fmt
    records = read_edits(SHARED_DATA / name)
    assert len(records) == len(raw)
    assert all(isinstance(r, EditRecord) and r.prompt.strip() and r.target.strip() for r in records)


def test_mend_zsre_fields(tmp_path):
    raw = _few("zsre/zsre_mend_dev.json")
    records = read_edits(SHARED_DATA / "zsre/zsre_mend_dev.json")[:5]
    for r, src in zip(records, raw):
        assert (r.prompt, r.target, r.rephrase) == (src["src"], src["alt"], src["rephrase"])
        assert (r.locality_prompt, r.locality_answer, r.subject) == (src["loc"], src["loc_ans"], src["subject"])


def test_knowedit_locality_is_the_first_relation_specificity_question():
    raw = _few("zsre/knowedit_zsre_test.json")
    record = read_edits(SHARED_DATA / "zsre/knowedit_zsre_test.json")[0]
    first = raw[0]["locality"]["Relation_Specificity"][0]
    assert (record.prompt, record.target, record.rephrase) == (raw[0]["prompt"], raw[0]["target_new"],
                                                               raw[0]["rephrase_prompt"])
    assert (record.locality_prompt, record.locality_answer) == (first["prompt"], first["ground_truth"][0])


def test_rome_counterfact_formats_the_template():
    raw = _few("counterfact/counterfact_rome_format_275.json")[0]
    record = read_edits(SHARED_DATA / "counterfact/counterfact_rome_format_275.json")[0]
    rewrite = raw["requested_rewrite"]
    assert record.prompt == rewrite["prompt"].format(rewrite["subject"])
    assert record.target == rewrite["target_new"]["str"] and record.id == "0"
    assert record.rephrase == raw["paraphrase_prompts"][0]
    assert (record.locality_prompt, record.locality_answer) == (raw["neighborhood_prompts"][0],
                                                                rewrite["target_true"]["str"])
    assert record.extra["neighborhood_prompts"] == raw["neighborhood_prompts"]


def test_easyedit_counterfact_locality_answer_is_the_true_object():
    raw = _few("counterfact/counterfact_500_easyedit.json")[0]
    record = read_edits(SHARED_DATA / "counterfact/counterfact_500_easyedit.json")[0]
    assert (record.prompt, record.target, record.rephrase) == (raw["prompt"], raw["target_new"], raw["rephrase_prompt"])
    assert (record.locality_prompt, record.locality_answer) == (raw["locality_prompt"], raw["ground_truth"])


def test_wise_formats_and_wikibio():
    hallucination = read_edits(SHARED_DATA / "hallucination/hallucination-edit.json")[0]
    raw = _few("hallucination/hallucination-edit.json")[0]
    assert (hallucination.prompt, hallucination.target) == (raw["prompt"], raw["target_new"])
    assert hallucination.locality_answer == raw["locality_ground_truth"] and hallucination.rephrase is None
    temporal = read_edits(SHARED_DATA / "temporal/temporal-edit.json")[0]
    assert temporal.rephrase == _few("temporal/temporal-edit.json")[0]["ood_rephrase"]
    wikibio = read_edits(SHARED_DATA / "wikibio/knowedit_wikibio_test.json")[0]
    raw = _few("wikibio/knowedit_wikibio_test.json")[0]
    assert (wikibio.prompt, wikibio.target, wikibio.subject) == (raw["text"], raw["labels"], raw["concept"])


@pytest.mark.parametrize(("name", "field"), [
    ("zsre/zsre_mend_dev.json", "alt"),
    ("zsre/knowedit_zsre_test.json", "target_new"),
    ("counterfact/counterfact_500_easyedit.json", "target_new"),
    ("hallucination/hallucination-edit.json", "target_new"),
    ("wikibio/knowedit_wikibio_test.json", "labels"),
])
def test_a_missing_field_names_file_record_and_field(tmp_path, name, field):
    rows = _few(name, 3)
    del rows[2][field]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=rf"broken.json: record 2: missing field '{field}'"):
        read_edits(path)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda r: r["requested_rewrite"].update(prompt="no placeholder"), r"exactly one '\{\}'"),
    (lambda r: r["requested_rewrite"].update(target_new="English"), r"'target_new' must be an object"),
    (lambda r: r.update(neighborhood_prompts=[1, 2]), r"'neighborhood_prompts' must be a list of strings"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=""), r"empty 'target'"),
])
def test_rome_counterfact_malformed(tmp_path, mutate, match):
    rows = _few("counterfact/counterfact_rome_format_275.json", 2)
    mutate(rows[1])
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=rf"cf.json: record 1.*{match}"):
        read_edits(path)


def test_knowedit_malformed_locality(tmp_path):
    rows = _few("zsre/knowedit_zsre_test.json", 2)
    path = tmp_path / "ke.json"
    # an empty answer (real files have a few) keeps the probe, without an answer to score against
    rows[1]["locality"]["Relation_Specificity"][0]["ground_truth"] = []
    path.write_text(json.dumps(rows))
    kept = read_edits(path)[1].probes_of("same_subject")[0]
    assert kept.prompt == rows[1]["locality"]["Relation_Specificity"][0]["prompt"] and kept.answer is None
    # an answer of the wrong type is an error naming the record and the field
    rows[1]["locality"]["Relation_Specificity"][0]["ground_truth"] = 5
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"record 1: field 'locality.Relation_Specificity\[0\].ground_truth': answers must be"):
        read_edits(path)


def test_unknown_format_lists_the_known_ones(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"odd.jsonl: line 1: unknown record format.*mend-zsre"):
        read_edits(path)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_edits(SHARED_DATA / "zsre/zsre_mend_dev.json", format="xml")


# ----------------------------------------------------------------------------- property-based

KNOWN_KEYS = sorted({k for f in FORMATS for k in f.required} | {
    "rephrase", "loc", "loc_ans", "subject", "rephrase_prompt", "locality_prompt", "locality_answer", "id",
    "case_id", "paraphrase_prompts", "neighborhood_prompts", "ood_rephrase", "concept", "extra"})

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=12), st.just(""), st.just("{}"))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(KNOWN_KEYS + ["prompt", "str", "Relation_Specificity", "ground_truth"]),
                    inner, max_size=4)), max_leaves=10)
record = st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(string.ascii_letters, max_size=6), json_value,
                         max_size=8)


def _check(path):
    try:
        records = read_edits(path)
    except DataError as err:
        assert str(path.name) in str(err) or "unknown format" in str(err)
        return
    assert records and all(isinstance(r, EditRecord) for r in records)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(record, json_value), min_size=4, max_size=4), jsonl=st.booleans())
def test_any_malformed_records_give_a_data_error(tmp_path, rows, jsonl):
    """2,500 files of 4 records each: 10,000 malformed records per run (issue 14)."""
    path = tmp_path / ("fuzz.jsonl" if jsonl else "fuzz.json")
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    _check(path)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_content_gives_a_data_error_or_records(tmp_path, content):
    path = tmp_path / "fuzz.data"
    path.write_bytes(content)
    _check(path)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(sorted(REAL_FILES)), data=st.data())
def test_real_records_with_a_field_broken_give_a_data_error(tmp_path, base, data):
    row = _few(base, 1)[0]
    key = data.draw(st.sampled_from(sorted(row)))
    row[key] = data.draw(json_value)
    path = tmp_path / "mutant.json"
    path.write_text(json.dumps([row]))
    _check(path)
