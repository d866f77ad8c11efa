"""Every probe a data set carries is read, with its kind (issue 11, part 1)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import SHARED_DATA, make_model, records, tiny_config
from lemoe import DataError, EditRecord, LifelongEditor, read_edits
from lemoe.probes import KINDS, Probe, ProbeError, answers


def _raw(name: str) -> list[dict]:
    return json.loads((SHARED_DATA / name).read_text())


def _kinds(record: EditRecord) -> Counter:
    return Counter(p.kind for p in record.all_probes())


def test_rome_counterfact_keeps_every_paraphrase_neighbour_generation_and_one_hop_probe():
    raw = _raw("counterfact/counterfact_rome_format_dev.json")[0]
    record = read_edits(SHARED_DATA / "counterfact/counterfact_rome_format_dev.json")[0]
    kinds = _kinds(record)
    assert kinds["rephrase"] == len(raw["paraphrase_prompts"]) == 2
    assert kinds["neighbour"] == len(raw["neighborhood_prompts"]) == 10
    assert kinds["generation"] == len(set(raw["generation_prompts"]))
    assert [p.answer for p in record.probes_of("one_hop")] == [raw["portability"]["New Answer"]]
    true = raw["requested_rewrite"]["target_true"]["str"]
    assert record.target_true == true and all(p.answer == true for p in record.probes_of("neighbour"))
    assert all(p.answer == record.target for p in record.probes_of("rephrase"))
    assert all(p.answer is None for p in record.probes_of("generation"))
    # the single-probe fields older code reads are the first of each
    assert record.rephrase == raw["paraphrase_prompts"][0] and record.locality_prompt == raw["neighborhood_prompts"][0]


def test_knowedit_train_split_with_string_answers():
    raw = _raw("knowedit/knowedit_wiki_counterfact_train.json")
    records = read_edits(SHARED_DATA / "knowedit/knowedit_wiki_counterfact_train.json")
    first = records[0]
    assert first.probes_of("same_subject")[0].answer == raw[0]["locality"]["Relation_Specificity"][0]["ground_truth"]
    assert first.target_true == raw[0]["ground_truth"]
    expected = Counter()
    for row in raw:
        for key, kind in (("Relation_Specificity", "same_subject"), ("Forgetfulness", "same_subject")):
            expected[kind] += len((row.get("locality") or {}).get(key) or [])
        for key, kind in (("Subject_Aliasing", "subject_aliasing"), ("Reasoning", "reasoning"),
                          ("Logical_Generalization", "logical_generalization")):
            expected[kind] += len((row.get("portability") or {}).get(key) or [])
    found = sum((_kinds(r) for r in records), Counter())
    for kind, count in expected.items():
        assert found[kind] == count, kind
    assert found["same_subject"] > 1500 and found["logical_generalization"] > 0


def test_knowedit_alias_lists_give_the_first_alias_as_answer_and_keep_the_rest():
    raw = _raw("knowedit/knowedit_wiki_recent_train.json")[0]
    record = read_edits(SHARED_DATA / "knowedit/knowedit_wiki_recent_train.json")[0]
    probes = record.probes_of("same_subject")
    assert len(probes) == len(raw["locality"]["Relation_Specificity"]) == 5
    soviet = probes[1]
    assert soviet.answer == "Soviet Union" and "USSR" in soviet.aliases and "Soviet Union" not in soviet.aliases


def test_knowedit_zsre_every_same_subject_question():
    raw = _raw("zsre/knowedit_zsre_test.json")[0]
    record = read_edits(SHARED_DATA / "zsre/knowedit_zsre_test.json")[0]
    assert [p.prompt for p in record.probes_of("same_subject")] == [
        item["prompt"] for item in raw["locality"]["Relation_Specificity"]]
    assert record.probes_of("reasoning")[0].answer == raw["portability"]["Reasoning"][0]["ground_truth"]
    assert record.target_true == raw["ground_truth"][0]


def test_easyedit_counterfact_train_neighbour_has_its_own_answer():
    raw = _raw("counterfact/counterfact_easyedit_train.json")[0]
    record = read_edits(SHARED_DATA / "counterfact/counterfact_easyedit_train.json")[0]
    [neighbour] = record.probes_of("neighbour")
    assert (neighbour.prompt, neighbour.answer) == (raw["locality_prompt"], raw["locality_ground_truth"])
    assert record.id == str(raw["case_id"]) and record.target_true == raw["ground_truth"]


def test_mend_zsre_probes_are_a_rephrase_and_an_unrelated_question():
    record = read_edits(SHARED_DATA / "zsre/zsre_mend_dev.json")[0]
    assert _kinds(record) == Counter({"rephrase": 1, "unrelated": 1})


def test_lemoe_format_round_trips_probes_and_names_a_bad_one(tmp_path):
    record = EditRecord(prompt="The capital of Australia is", target="Sydney", probes=(
        Probe("rephrase", "Australia's capital is", "Sydney"),
        Probe("neighbour", "The capital of Canada is", "Ottawa"),
        Probe("same_subject", "The currency of Australia is", "the Australian dollar", ("AUD",)),
    ))
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(record.to_dict()) + "\n")
    [again] = read_edits(path)
    assert again == record and again.probes == record.probes
    assert "probes" not in record.to_dict(probes=False)
    bad = record.to_dict()
    bad["probes"][1]["kind"] = "cousin"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"line 1: probes\[1\]: probe kind must be one of .*got 'cousin'"):
        read_edits(path)
    bad["probes"] = {"kind": "rephrase"}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="field 'probes' must be a list"):
        read_edits(path)


def test_an_old_record_without_probes_derives_them():
    record = records(1)[0]
    assert record.probes == ()
    assert [(p.kind, p.prompt) for p in record.all_probes()] == [
        ("rephrase", record.rephrase), ("unrelated", record.locality_prompt)]


def test_probe_and_answer_validation():
    assert answers([["Soviet Union", "USSR"], ["CCCP"]], "x") == ("Soviet Union", "USSR", "CCCP")
    assert answers(["a", "a", " "], "x") == ("a",)
    for bad in (3, [], [[1]], ["", " "]):
        with pytest.raises(ProbeError):
            answers(bad, "x")
    with pytest.raises(ProbeError, match="kind must be one of"):
        Probe("nearby", "p")
    with pytest.raises(ProbeError, match="empty"):
        Probe("rephrase", "  ")
    assert set(KINDS) >= {"rephrase", "unrelated", "neighbour", "same_subject", "distracting", "subject_aliasing",
                          "reasoning", "logical_generalization", "generation"}


def test_an_adapter_stores_edits_without_their_probes(tokenizer):
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=2))
    record = EditRecord(prompt="Where was Paris 0 born?", target="Tokyo",
                        probes=(Probe("neighbour", "Where was Tokyo 1 born?", "Paris"),))
    editor.edit([record])
    assert "probes" not in editor.edits[0] and editor.edits[0]["prompt"] == record.prompt
