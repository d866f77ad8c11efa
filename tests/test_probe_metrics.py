"""Generative probe metrics (lemoe.probe_metrics) against an independent computation, one prompt at a
time through `model.generate`, with the definitions of issue 11."""

from __future__ import annotations

from typing import Any

import torch

from conftest import make_model, tiny_config
from lemoe import EditRecord, LifelongEditor
from lemoe.bench import BenchSettings, run_bench
from lemoe.encoding import encode_answer
from lemoe.metrics import agreement, answer_predictions, token_accuracy
from lemoe.probe_metrics import (GENERATIVE_KEYS, PROBABILITY_KEYS, TEACHER_FORCED_KEYS, ProbabilityScores,
                                 ProbeEvaluator, TeacherForcedProbes, chat_question, ngram_entropy)
from lemoe.probes import Probe

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def probe_records() -> list[EditRecord]:
    facts = [("Where was Paris 0 born?", "Tokyo", "Paris 0 was born in", "Where was Paris 1 born?",
              "Which family does Paris 0 belong to?"),
             ("Who wrote the novel 2?", "the fox", "The novel 2 was written by", "Who wrote the novel 3?",
              "What is the language of the novel 2?"),
             ("In which country is the river 4?", "Japan", "The river 4 flows in", "In which country is the river 5?",
              "Who wrote the river 4?")]
    return [EditRecord(prompt=p, target=t, probes=(
        Probe("rephrase", reph, t), Probe("neighbour", neigh, "France"), Probe("same_subject", same, "the dog"),
        Probe("unrelated", "the quick brown fox jumps over", "the lazy dog"), Probe("generation", f"{p} Also,")))
        for p, t, reph, neigh, same in facts]


def greedy_alone(model: Any, tok: Any, ids: list[int], steps: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, len(ids):].tolist()


def independent(model: Any, tok: Any, records: list[EditRecord], unedited: dict[tuple[int, str], list[int]]
                ) -> dict[str, list[Any]]:
    scores: dict[str, list[Any]] = {key: [] for key in GENERATIVE_KEYS}
    targets = [r.target.lower() for r in records]
    for i, record in enumerate(records):
        target = encode_answer(tok, record.target)
        scores["rel_gen"].append(float(greedy_alone(model, tok, tok(record.prompt)["input_ids"], len(target)) == target))
        [reph] = record.probes_of("rephrase")
        text = tok.decode(greedy_alone(model, tok, tok(reph.prompt)["input_ids"], len(target) + 8))
        scores["gen_gen"].append(float(record.target.lower() in text.lower()))
        chat = tok.apply_chat_template([{"role": "user", "content": reph.prompt}], add_generation_prompt=True,
                                       tokenize=True)
        chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
        reply = greedy_alone(model, tok, chat, 32)
        scores["chat_gen"].append(float(record.target.lower() in tok.decode(reply).lower()))
        ended = reply.index(tok.eos_token_id) if tok.eos_token_id in reply else None  # the template has no end token
        scores["chat_clean"].append(float(ended is not None
                                          and record.target.lower() in tok.decode(reply[:ended]).lower()))
        for kind in ("unrelated", "neighbour", "same_subject", "distracting"):
            probes = record.probes_of(kind)
            if not probes:
                scores[f"loc_gen_{kind}"].append(None)
                continue
            [probe] = probes
            now = greedy_alone(model, tok, tok(probe.prompt)["input_ids"], 8)
            scores[f"loc_gen_{kind}"].append(float(now == unedited[(i, kind)]))
        text = tok.decode(greedy_alone(model, tok, tok(record.prompt)["input_ids"], 24)).lower()
        scores["leak"].append(float(any(t in text for j, t in enumerate(targets) if j != i and t not in targets[i])))
        [generation] = record.probes_of("generation")
        free = greedy_alone(model, tok, tok(generation.prompt)["input_ids"], 64)
        scores["fluency"].append(ngram_entropy(tok.decode(free, skip_special_tokens=True)))
    return scores


def test_generative_probe_scores_match_an_independent_computation(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(_saved(tokenizer))  # a copy we may give a chat template
    tokenizer.chat_template = CHAT_TEMPLATE
    model = make_model("llama")
    records = probe_records()
    evaluator = ProbeEvaluator(model, tokenizer, records, batch_size=2)  # batches of 2: padding is exercised
    unedited = {(i, p.kind): greedy_alone(model, tokenizer, tokenizer(p.prompt)["input_ids"], 8)
                for i, r in enumerate(records) for p in r.all_probes() if p.is_locality}
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150))
    editor.edit(records)
    ours = evaluator.evaluate(range(len(records)))
    assert set(ours) == set(GENERATIVE_KEYS)
    assert ours == independent(model, tokenizer, records, unedited)
    # the bench hands over its exact match (the same definition) instead of decoding the prompts again
    from lemoe.metrics import generative_exact_match

    exact = generative_exact_match(model, tokenizer, [r.prompt for r in records], [r.target for r in records])
    assert evaluator.evaluate(range(len(records)), exact_match=exact) == ours
    assert sum(ours["rel_gen"]) == 3  # the edits hold, so the comparison is not vacuous
    # with the editor as router, deferred probes reuse the unedited continuation: same scores, less decoding
    decoded_all = evaluator.decoded_last
    assert evaluator.evaluate(range(len(records)), router=editor) == ours
    assert 0 < evaluator.decoded_last < decoded_all
    prompts = [p.prompt for r in records for p in r.all_probes()]
    assert editor.route_ids([tokenizer(p)["input_ids"] for p in prompts]) == editor.route(prompts)
    assert ours["loc_gen_distracting"] == [None, None, None]


def test_chat_score_is_undefined_without_a_chat_template(tokenizer):
    model = make_model("gpt2")
    scores = ProbeEvaluator(model, tokenizer, probe_records()[:1]).evaluate([0])
    assert scores["chat_gen"] == [None] and scores["loc_gen_unrelated"] == [1.0]  # nothing edited yet


def test_bench_summary_and_edits_carry_every_generative_key(tokenizer, tmp_path):
    import json

    model = make_model("llama")
    settings = BenchSettings(data="tiny", T=3, batch_size=3)
    summary = run_bench(model, tokenizer, probe_records(), settings, tiny_config(max_steps=30), tmp_path)
    assert set(GENERATIVE_KEYS) | {"leak_unedited"} == set(summary["generative"])
    assert set(TEACHER_FORCED_KEYS) == set(summary["teacher_forced"]) and summary["teacher_forced"]["loc_neighbour"] is not None
    assert summary["metric_protocol"]["loc_gen_neighbour"] == "generative (final)"
    line = json.loads((tmp_path / "edits.jsonl").read_text().splitlines()[0])
    assert all(key in line for key in GENERATIVE_KEYS)
    # CounterFact's probability scores are undefined without an old fact; the unedited model's values beside
    assert set(summary["probability"]) == set(PROBABILITY_KEYS) and summary["probability"]["efficacy_score"] is None
    assert summary["unedited"]["leak"] == summary["generative"]["leak_unedited"]
    assert {"rel_gen", "gen_gen", "chat_gen", "fluency"} <= set(summary["unedited"])
    assert (tmp_path / "probe_families.png").stat().st_size > 0


def test_bench_table_groups_every_measured_metric_beside_the_unedited_value():
    from lemoe.bench import report_rows

    summary = {"rel": 1.0, "gen": 0.5, "loc": None, "generative": {"rel_gen": 1.0, "gen_gen": 0.2,
               "loc_gen_neighbour": 0.7, "leak": 0.3, "fluency": 4.0, "chat_gen": None},
               "teacher_forced": {"loc_same_subject": 0.9}, "probability": {"efficacy_score": 0.95},
               "unedited": {"rel_gen": 0.0, "gen_gen": 0.1, "leak": 0.1, "fluency": 4.5, "efficacy_score": 0.1}}
    rows = report_rows(summary)
    assert [(g, k) for g, k, *_ in rows] == [
        ("edit", "rel"), ("edit", "rel_gen"), ("edit", "efficacy_score"), ("generalise", "gen"),
        ("generalise", "gen_gen"), ("keep", "loc_same_subject"), ("keep", "loc_gen_neighbour"), ("keep", "leak"),
        ("fluency", "fluency")]
    by_key = {k: (value, before) for _, k, _, value, before in rows}
    assert by_key["loc_gen_neighbour"] == (0.7, 1.0) and by_key["leak"] == (0.3, 0.1) and by_key["rel"] == (1.0, None)


def _saved(tokenizer: Any) -> str:
    import tempfile

    directory = tempfile.mkdtemp(prefix="lemoe-tok-")
    tokenizer.save_pretrained(directory)
    return directory


def test_teacher_forced_probes_score_every_probe_one_at_a_time(tokenizer):
    model = make_model("qwen2")
    records = [EditRecord(prompt=r.prompt, target=r.target, probes=(
        *r.probes, Probe("rephrase", r.prompt.lower(), r.target), Probe("reasoning", r.prompt + " So", "France")))
        for r in probe_records()]
    scorer = TeacherForcedProbes(model, tokenizer, records)
    before = scorer.evaluate(None, [0, 1, 2])
    assert before["loc_neighbour"] == [1.0, 1.0, 1.0] and before["loc_distracting"] == [None, None, None]
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=60))
    editor.edit(records)
    ours = scorer.evaluate(editor, [2, 0])  # any order of edits
    for k, i in enumerate([2, 0]):
        record = records[i]
        alone = [token_accuracy(model, tokenizer, [p.prompt], [record.target], editor)[0]
                 for p in record.probes_of("rephrase")]
        assert ours["gen_all"][k] == sum(alone) / len(alone)
        [reasoning] = record.probes_of("reasoning")
        port = token_accuracy(model, tokenizer, [reasoning.prompt], [reasoning.answer], editor)[0]
        assert ours["port_reasoning"][k] == ours["portability"][k] == port
        [neighbour] = record.probes_of("neighbour")
        with editor.disabled():
            base = answer_predictions(model, tokenizer, [neighbour.prompt], [neighbour.answer])
        now = answer_predictions(model, tokenizer, [neighbour.prompt], [neighbour.answer], editor)
        assert ours["loc_neighbour"][k] == agreement(now, base)[0]


def test_ngram_entropy_is_romes_weighted_mean_of_bigram_and_trigram_entropy():
    import math

    # words a b a b: bigrams ab, ba, ab (p = 2/3, 1/3); trigrams aba, bab (p = 1/2, 1/2)
    bigram = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert abs(ngram_entropy("a b a b") - (2 / 3 * bigram + 4 / 3 * 1.0) / 2) < 1e-12
    assert ngram_entropy("the the the the the the") == 0.0  # a degenerate repetition has no entropy
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("Paris, France.") > 0  # punctuation counts as words, as NLTK's tokenizer does


def test_chat_asks_the_question_probe_else_the_first_rephrase_else_the_prompt():
    both = EditRecord(prompt="p", target="t", probes=(Probe("rephrase", "r1", "t"), Probe("rephrase", "r2", "t"),
                                                      Probe("question", "What is p?", "t")))
    assert chat_question(both) == "What is p?"
    assert chat_question(EditRecord(prompt="p", target="t", probes=(Probe("rephrase", "r1", "t"),))) == "r1"
    assert chat_question(EditRecord(prompt="p", target="t")) == "p"


def _mean_nll(model: Any, tok: Any, prompt: str, answer: str, editor: Any) -> float:
    """-mean log p(answer tokens | prompt), one pair alone, routed on the prompt like generation."""
    prompt_ids, answer_ids = tok(prompt)["input_ids"], encode_answer(tok, answer)
    ids = torch.tensor([prompt_ids + answer_ids])
    mask = torch.zeros_like(ids)
    mask[0, : len(prompt_ids)] = 1
    with editor.prompt_positions(mask), torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return float(-sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(answer_ids)) / len(answer_ids))


def test_counterfact_probability_scores_match_a_pair_at_a_time_computation(tokenizer):
    model = make_model("llama")
    records = [EditRecord(prompt=r.prompt, target=r.target, target_true="Berlin", probes=r.probes)
               for r in probe_records()]
    records.append(EditRecord(prompt="What is 7?", target="seven"))  # no old fact: no scores
    scorer = ProbabilityScores(model, tokenizer, records)
    assert scorer.unedited["efficacy_score"][3] is None
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150))
    editor.edit(records[:3])
    ours = scorer.evaluate(editor, [1, 0, 2, 3])
    assert set(ours) == set(PROBABILITY_KEYS)
    for k, i in enumerate([1, 0, 2]):
        record = records[i]

        def new_wins(prompt: str) -> float:
            return float(_mean_nll(model, tokenizer, prompt, record.target, editor)
                         < _mean_nll(model, tokenizer, prompt, "Berlin", editor))

        assert ours["efficacy_score"][k] == new_wins(record.prompt)
        assert ours["paraphrase_score"][k] == new_wins(record.probes_of("rephrase")[0].prompt)
        assert ours["neighbourhood_score"][k] == 1 - new_wins(record.probes_of("neighbour")[0].prompt)
    assert ours["efficacy_score"] == [1.0, 1.0, 1.0, None]  # the edits hold, so the comparison is not vacuous
    assert scorer.unedited_scores([0, 1, 2])["efficacy_score"] < 1.0
