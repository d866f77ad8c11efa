"""Baseline editors (FT-L, MEMoE, GRACE, WISE) on tiny models, and the comparison command at T=6."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import logits_of, make_model, records
from lemoe.baselines import (BASELINES, FTLConfig, GRACEConfig, MEMoEConfig, WISEConfig, load_editor,
                             make_editor)
from lemoe.baselines.wise import ties_merge
from lemoe.bench import BenchSettings, run_comparison
from lemoe.editor import LifelongEditor
from lemoe.metrics import token_accuracy
from lemoe.persistence import AdapterError

CONFIGS = {
    "ft-l": FTLConfig(layer=1, lr=1e-2, max_steps=30),
    "memoe": MEMoEConfig(layer=1, lr=1e-2, max_steps=30, lora_rank=4),
    "grace": GRACEConfig(layer=1, max_steps=30),
    "wise": WISEConfig(layer=1, lr=1e-2, max_steps=30, shard_edits=4, num_shards=2),
}


@pytest.fixture(params=sorted(BASELINES))
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def _accuracy(model, tokenizer, editor, batch):
    return token_accuracy(model, tokenizer, [r.prompt for r in batch], [r.target for r in batch], editor)


def test_edit_changes_the_prediction_and_unload_restores(method, tokenizer, arch):
    model = make_model(arch)
    batch = records(6)
    before = logits_of(model, tokenizer, [r.prompt + " " + r.target for r in batch])
    editor = make_editor(method, model, tokenizer, CONFIGS[method])
    base = _accuracy(model, tokenizer, editor, batch)
    for start in range(0, 6, 2):
        report = editor.edit(batch[start : start + 2])
        assert report.num_edits == 2 and report.steps >= 1
    after = _accuracy(model, tokenizer, editor, batch)
    assert sum(after) > sum(base), f"{method}: no edit changed its target's prediction ({base} -> {after})"
    assert len(editor.edits) == 6
    editor.unload()
    assert torch.equal(logits_of(model, tokenizer, [r.prompt + " " + r.target for r in batch]), before)
    with pytest.raises(RuntimeError, match="unloaded"):
        editor.edit(batch[:1])


def test_state_saves_and_reloads(method, tokenizer, tmp_path):
    model = make_model("llama")
    batch = records(4)
    editor = make_editor(method, model, tokenizer, CONFIGS[method])
    editor.edit(batch[:2])
    editor.edit(batch[2:])
    scores = _accuracy(model, tokenizer, editor, batch)
    with torch.no_grad():
        logits = logits_of(model, tokenizer, [r.prompt for r in batch])
    editor.save(tmp_path / "state")
    editor.unload()

    loaded = load_editor(model, tokenizer, tmp_path / "state")
    assert type(loaded) is BASELINES[method] and loaded.config == editor.config
    assert _accuracy(model, tokenizer, loaded, batch) == scores
    assert torch.allclose(logits_of(model, tokenizer, [r.prompt for r in batch]), logits, atol=1e-5)
    assert [e["prompt"] for e in loaded.edits] == [r.prompt for r in batch]
    loaded.edit(records(2, offset=10))  # editing goes on after a reload
    assert len(loaded.edits) == 6
    loaded.unload()
    # a LEMoE editor refuses a baseline's state by name
    with pytest.raises(AdapterError, match=method):
        LifelongEditor.load(model, tokenizer, tmp_path / "state")


def test_state_for_another_model_is_refused(method, tokenizer, tmp_path):
    model = make_model("llama")
    editor = make_editor(method, model, tokenizer, CONFIGS[method])
    editor.edit(records(2))
    editor.save(tmp_path / "state")
    editor.unload()
    with pytest.raises(AdapterError, match="other weights|was made for"):
        load_editor(make_model("llama", seed=1), tokenizer, tmp_path / "state")


def test_generation_keeps_the_prompt_decision(tokenizer):
    """GRACE and WISE decide from the prompt; cached decode steps reuse that decision, so greedy
    generation is what teacher-forced scoring with the prompt mask predicts for the same text."""
    model = make_model("llama")
    for method in ("grace", "wise"):
        editor = make_editor(method, model, tokenizer, CONFIGS[method])
        editor.edit(records(2))
        ids = tokenizer(records(1)[0].prompt, return_tensors="pt")["input_ids"]
        assert editor.route([records(1)[0].prompt]) == [0]  # the edited prompt takes the edited path
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
        prompt_mask = torch.zeros_like(generated)
        prompt_mask[:, : ids.shape[1]] = 1
        with torch.no_grad(), editor.prompt_positions(prompt_mask):
            logits = model(generated).logits
        predicted = logits[0, ids.shape[1] - 1 : -1].argmax(-1)
        assert torch.equal(predicted, generated[0, ids.shape[1]:]), method
        editor.unload()


def test_grace_defers_far_inputs_and_widens_for_the_same_target(tokenizer):
    model = make_model("llama")
    editor = make_editor("grace", model, tokenizer, GRACEConfig(layer=1, radius=1e-3, max_steps=5))
    batch = records(2)
    editor.edit(batch)
    assert editor.num_experts == 2  # two keys far apart with a tiny radius: two entries
    assert editor.route([batch[0].prompt, batch[1].prompt]) == [0, 1]
    assert editor.route(["the quick brown fox jumps over"]) == [None]
    same = type(batch[0])(prompt=batch[0].prompt + " ", target=batch[0].target)
    editor.edit([same])  # nearly the same key and the same target: widen entry 0, no new entry
    assert editor.num_experts in (2, 3) and editor.edits[-1]["expert"] in (0, 2)
    editor.unload()


def test_memoe_trains_every_expert_and_its_gate(tokenizer):
    model = make_model("llama")
    editor = make_editor("memoe", model, tokenizer, CONFIGS["memoe"])
    gate = editor.module.gate.weight.clone()
    editor.edit(records(2))
    first = [e.lora_B.clone() for e in editor.module.experts]
    editor.edit(records(2, offset=2))
    assert not torch.equal(editor.module.gate.weight, gate)  # the router keeps training
    changed = [not torch.equal(e.lora_B, b) for e, b in zip(editor.module.experts, first)]
    assert any(changed)  # earlier experts are not frozen
    assert editor.routing_consistency() is not None
    editor.unload()


def test_wise_routes_edits_to_side_memory_and_merges_shards(tokenizer):
    model = make_model("llama")
    config = WISEConfig(layer=1, lr=1e-2, max_steps=30, shard_edits=2, num_shards=2, alpha=0.5, beta=2.0, gamma=1.0)
    editor = make_editor("wise", model, tokenizer, config)
    assert editor.route(["anything"]) == [None]  # no edit yet: the main memory answers everything
    editor.edit(records(2))
    assert len(editor.round_shards) == 1  # shard full after 2 edits
    editor.edit(records(2, offset=2))
    assert editor.round_shards == []  # two full shards: merged into the side memory
    assert torch.equal(editor.module.merged, editor.module.side)
    assert editor.routing_consistency() is not None and editor.routing_consistency() > 0
    editor.unload()


def test_ties_merge_elects_signs_and_averages_agreeing_entries():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.equal(ties_merge([a, b]), torch.tensor([2.0, -2.0, 0.0, 3.0]))
    assert torch.equal(ties_merge([a]), a)


def test_bad_baseline_configs_are_refused():
    with pytest.raises(ValueError, match="radius"):
        GRACEConfig(radius=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        WISEConfig(mask_ratio=1.5)
    with pytest.raises(ValueError, match="top_k"):
        MEMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="norm_constraint"):
        FTLConfig(norm_constraint=-1.0)
    with pytest.raises(ValueError, match="unknown method"):
        make_editor("rome", make_model("llama"), None)


def test_comparison_runs_every_method_at_T6(tokenizer, tmp_path, monkeypatch):
    model = make_model("llama")
    settings = BenchSettings(data="tiny", T=6, batch_size=2, generative=True)
    from conftest import tiny_config
    from lemoe import bench

    built = []
    original = bench.Evaluator.__init__
    monkeypatch.setattr(bench.Evaluator, "__init__", lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    configs = {"lemoe": tiny_config(), **CONFIGS}
    result = run_comparison(model, tokenizer, records(6), settings, ["lemoe", *sorted(BASELINES)], configs,
                            tmp_path / "cmp")
    assert set(result["methods"]) == {"lemoe", *BASELINES}
    assert len(built) == 1  # the unedited model's outputs are taken once for every method
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for method, summary in saved["methods"].items():
        assert summary["method"] == method and summary["T"] == 6
        assert summary["final"]["rel"] is not None and summary["adapter_bytes"] > 0
        assert [p["edits"] for p in summary["curve"]] == [2, 4, 6]
        assert (tmp_path / "cmp" / method / "summary.json").is_file()
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in saved["methods"])
    assert (tmp_path / "cmp" / "forgetting_curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown method"):
        run_comparison(model, tokenizer, records(6), settings, ["lemoe", "rome"])
