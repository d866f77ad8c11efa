"""The demo's built-in facts and its pass marks (lemoe.demo): every fact is asked every way, and a mark
is the bench's generative definition."""

from __future__ import annotations

from conftest import make_model, tiny_config
from lemoe import LifelongEditor
from lemoe.demo import SECTIONS, DemoProbe, decode_probes, demo_edits, demo_probes, section_scores
from lemoe.encoding import encode_answer
from lemoe.probe_metrics import ProbeEvaluator, macro_average


def test_every_built_in_fact_is_asked_every_way():
    edits = demo_edits()
    assert len(edits) == 20 and len({e.prompt for e in edits}) == 20
    for edit in edits:
        kinds = [p.kind for p in edit.probes]
        assert kinds.count("rephrase") == 1 and kinds.count("question") == 1
        assert kinds.count("neighbour") >= 2 and kinds.count("same_subject") == 2
        assert edit.subject and edit.subject in edit.prompt  # routing may use it (issue 12)
        assert edit.target.lower() not in " ".join(p.prompt.lower() for p in edit.probes)  # no probe gives it away
    probe_prompts = [p.prompt for e in edits for p in e.probes if p.is_locality]
    assert not set(probe_prompts) & {e.prompt for e in edits}  # no locality probe is another fact's edit
    assert demo_edits(3) == edits[:3]


def test_marks_follow_the_generative_definitions(tokenizer):
    target = encode_answer(tokenizer, "Lyon")
    edited = DemoProbe("edited prompt", 0, "p", "Lyon", [1], len(target), after=target)
    assert edited.passed(tokenizer, target)
    assert not DemoProbe("edited prompt", 0, "p", "Lyon", [1], 2, after=[5, *target]).passed(tokenizer, target)
    text_ids = tokenizer("It is lyon, of course")["input_ids"]
    assert DemoProbe("rephrase", 0, "p", "Lyon", [1], 9, after=text_ids).passed(tokenizer, target)  # any case
    assert DemoProbe("neighbour", 0, "p", "Tokyo", [1], 8, before=[3, 4], after=[3, 4]).passed(tokenizer, target)
    assert not DemoProbe("same subject", 0, "p", "x", [1], 8, before=[3, 4], after=[3, 5]).passed(tokenizer, target)


def test_demo_scores_agree_with_the_bench_evaluator(tokenizer):
    """Over the built-in facts on a tiny model: the section pass counts are the bench's macro averages."""
    model = make_model("llama")
    edits = demo_edits(4)
    probes = demo_probes(tokenizer, edits)
    assert {p.section for p in probes} == {s for s, _ in SECTIONS} - {"chat question"}  # no chat template
    decode_probes(model, tokenizer, probes, "before")
    evaluator = ProbeEvaluator(model, tokenizer, edits)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=80))
    editor.edit(edits)
    decode_probes(model, tokenizer, probes, "after")
    passed = section_scores(tokenizer, edits, probes)
    scores = macro_average(evaluator.evaluate(range(len(edits))))
    assert passed["edited prompt"] == (round(4 * scores["rel_gen"]), 4)
    assert passed["rephrase"] == (round(4 * scores["gen_gen"]), 4)
    assert passed["same subject"][1] == 8
    # every edit has two same-subject probes, so the per-edit mean and the pooled share agree
    assert abs(passed["same subject"][0] / 8 - scores["loc_gen_same_subject"]) < 1e-9
