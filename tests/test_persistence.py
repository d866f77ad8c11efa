"""Save / load / resume / rollback on disk, and refusal of adapters that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import logits_of, make_model, records, save_as_older, tiny_config
from lemoe import AdapterError, LifelongEditor
from lemoe import persistence
from lemoe.persistence import CONFIG_NAME, EDITS_NAME, WEIGHTS_NAME

PROBES = ["Where was Paris 0 born?", "Which family does Tokyo 1 belong to?", "the quick brown fox"]


def _edited(arch, tokenizer, batches=2, **config):
    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config(**config))
    for b in range(batches):
        editor.edit(records(2, offset=2 * b))
    return model, editor


def test_save_then_load_gives_identical_logits(arch, tokenizer, tmp_path):
    model, editor = _edited(arch, tokenizer)
    expected = logits_of(model, tokenizer, PROBES)
    editor.save(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME, EDITS_NAME]
    fresh = make_model(arch)
    loaded = LifelongEditor.load(fresh, tokenizer, tmp_path / "adapter")
    assert torch.equal(logits_of(fresh, tokenizer, PROBES), expected)
    assert loaded.edits == editor.edits and loaded.num_experts == 2
    assert loaded.route([r.prompt for r in records(4)]) == [0, 0, 1, 1]


def test_adapter_directory_contents(tokenizer, tmp_path):
    model, editor = _edited("llama", tokenizer)
    editor.save(tmp_path)
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert header["num_experts"] == 2 and header["num_edits"] == 4 and header["layer"] == 1
    assert header["config"]["expert"] == "lora" and header["lemoe_version"]
    lines = [json.loads(line) for line in (tmp_path / EDITS_NAME).read_text().splitlines()]
    assert [(e["batch"], e["expert"]) for e in lines] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert lines[0]["prompt"] == records(1)[0].prompt
    # nothing but adaptor tensors is stored: the base FFN is not in the file
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        names = list(handle.keys())
    assert names and not any(n.startswith("base_layer") for n in names)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_resume_after_a_kill_matches_an_uninterrupted_run(tokenizer, tmp_path):
    stream = records(8)
    model_a = make_model("llama")
    straight = LifelongEditor(model_a, tokenizer, tiny_config())
    straight.edit_stream(stream, batch_size=2)

    model_b = make_model("llama")
    killed = LifelongEditor.open(model_b, tokenizer, tmp_path / "run", tiny_config())

    class Killed(Exception):
        pass

    def kill_after_two(report):
        if report.batch == 1:
            raise Killed

    with pytest.raises(Killed):
        killed.edit_stream(stream, batch_size=2, on_batch=kill_after_two)
    killed.unload()  # the process is gone; only the directory is left

    model_c = make_model("llama")
    resumed = LifelongEditor.open(model_c, tokenizer, tmp_path / "run", tiny_config())
    assert len(resumed.edits) == 4
    reports = resumed.edit_stream(stream, batch_size=2)
    assert [r.batch for r in reports] == [2, 3]
    assert torch.equal(logits_of(model_c, tokenizer, PROBES), logits_of(model_a, tokenizer, PROBES))
    on_disk = LifelongEditor.load(make_model("llama"), tokenizer, tmp_path / "run")
    assert on_disk.edits == straight.edits


def test_a_kill_during_save_leaves_the_previous_save_intact(tokenizer, tmp_path, monkeypatch):
    model, editor = _edited("llama", tokenizer, batches=1)
    editor.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    editor.edit(records(2, offset=2))
    monkeypatch.setattr(persistence, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        editor.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert LifelongEditor.load(make_model("llama"), tokenizer, tmp_path).num_experts == 1


def test_stale_views_are_repaired_from_the_weights(tokenizer, tmp_path):
    model, editor = _edited("llama", tokenizer, batches=1)
    editor.save(tmp_path)
    (tmp_path / EDITS_NAME).write_text("")  # as if killed between the weights and the views
    (tmp_path / CONFIG_NAME).unlink()
    loaded = LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)  # reading: nothing is written
    assert len(loaded.edits) == 2 and (tmp_path / EDITS_NAME).read_text() == ""
    loaded.unload()
    LifelongEditor.open(make_model("llama"), tokenizer, tmp_path)  # a writer repairs them
    assert len((tmp_path / EDITS_NAME).read_text().splitlines()) == 2
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["num_edits"] == 2


def test_rollback_on_disk(tokenizer, tmp_path):
    model = make_model("llama")
    editor = LifelongEditor.open(model, tokenizer, tmp_path, tiny_config())
    editor.edit_stream(records(6), batch_size=2)
    editor.rollback(batches=2)
    loaded = LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)
    assert loaded.num_experts == 1 and len(loaded.edits) == 2
    assert len((tmp_path / EDITS_NAME).read_text().splitlines()) == 2


def test_resume_refuses_different_data_or_batch_size(tokenizer, tmp_path):
    model = make_model("llama")
    editor = LifelongEditor.open(model, tokenizer, tmp_path, tiny_config())
    editor.edit_stream(records(4), batch_size=2)
    with pytest.raises(ValueError, match="stored edit 0"):
        editor.edit_stream(records(4, offset=10), batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        editor.edit_stream(records(4), batch_size=4)


# ----------------------------------------------------------------------------- refusals


def test_loading_onto_another_model_is_refused(tokenizer, tmp_path):
    _, editor = _edited("llama", tokenizer, batches=1)
    editor.save(tmp_path)
    with pytest.raises(AdapterError, match="architecture"):
        LifelongEditor.load(make_model("gpt2"), tokenizer, tmp_path)
    other_weights = make_model("llama", seed=1)
    with pytest.raises(AdapterError, match="weights"):
        LifelongEditor.load(other_weights, tokenizer, tmp_path)
    # a refused load leaves the model untouched
    assert not any(type(m).__name__ == "LEMoELayer" for m in other_weights.modules())


def test_same_model_in_another_dtype_is_accepted(tokenizer, tmp_path):
    _, editor = _edited("llama", tokenizer, batches=1)
    editor.save(tmp_path)
    loaded = LifelongEditor.load(make_model("llama").to(torch.bfloat16), tokenizer, tmp_path)
    assert loaded.num_experts == 1


def test_truncated_safetensors_is_refused_and_not_touched(tokenizer, tmp_path):
    _, editor = _edited("llama", tokenizer, batches=1)
    editor.save(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    damaged = weights.read_bytes()
    with pytest.raises(AdapterError, match="corrupted or truncated"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)
    assert weights.read_bytes() == damaged


def test_newer_format_version_is_refused(tokenizer, tmp_path, monkeypatch):
    _, editor = _edited("llama", tokenizer, batches=1)
    monkeypatch.setattr(persistence, "FORMAT_VERSION", 99)
    state = persistence.AdapterState(config=editor.config.to_dict(), base_model=editor.identity,
                                     fingerprint=editor.fingerprint, layer=1, num_experts=1, edits=editor.edits,
                                     lemoe_version="9.9", format_version=99)
    persistence.save_adapter(tmp_path, state, editor.adapter_tensors())
    monkeypatch.setattr(persistence, "FORMAT_VERSION", 1)
    with pytest.raises(AdapterError, match="newer lemoe"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)


def test_format_1_adapter_routes_from_its_own_layer(tokenizer, tmp_path, monkeypatch):
    """Format 1 had no route_layer: it routed from the adaptor's layer, and still does after loading; nor
    had it the key, pooling and continuation fields of format 3: it keeps the pooled key over every token."""
    model, editor = _edited("llama", tokenizer, route_layer=1, key="pooled", pooling="mean")
    expected = logits_of(model, tokenizer, PROBES)
    config = editor.config.to_dict()
    for name in ("route_layer", "key", "pooling", "continuation_tokens", "subject_layer", "subject_threshold",
                 "relation_threshold"):
        del config[name]
    monkeypatch.setattr(persistence, "FORMAT_VERSION", 1)
    state = persistence.AdapterState(config=config, base_model=editor.identity, fingerprint=editor.fingerprint,
                                     layer=1, num_experts=2, edits=editor.edits, lemoe_version="0.1.0",
                                     format_version=1)
    persistence.save_adapter(tmp_path, state, editor.adapter_tensors())
    monkeypatch.undo()
    fresh = make_model("llama")
    loaded = LifelongEditor.load(fresh, tokenizer, tmp_path)
    assert loaded.route_layer_idx == 1 and loaded.config.route_layer == 1
    assert (loaded.config.key, loaded.config.pooling, loaded.config.continuation_tokens) == ("pooled", "mean", 0)
    assert torch.equal(logits_of(fresh, tokenizer, PROBES), expected)


def test_missing_directory_and_foreign_files_are_refused(tokenizer, tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a lemoe adapter"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path / "empty")
    from safetensors.torch import save_file

    (tmp_path / "peft").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "peft" / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="not written by lemoe"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path / "peft")


def test_a_failed_edit_does_not_damage_the_saved_adapter(tokenizer, tmp_path):
    from lemoe import DataError, EditRecord

    model = make_model("llama")
    editor = LifelongEditor.open(model, tokenizer, tmp_path, tiny_config())
    editor.edit(records(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    too_long = EditRecord(prompt="word " * 200, target="Paris")
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        editor.edit([records(1, offset=5)[0], too_long])
    with pytest.raises(DataError):
        editor.edit([])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert editor.num_experts == 1


def test_an_adapter_saved_before_chat_rows_were_the_default_keeps_them_off(tokenizer, tmp_path):
    """lemoe 0.7 trains chat rows by default; an adapter whose saved config has no `chat_rows` (lemoe <= 0.5)
    was made without them and resumes without them, while a new config gets them."""
    _, editor = _edited("llama", tokenizer, batches=1)
    assert LifelongEditor(make_model("llama"), tokenizer).config.chat_rows is True
    save_as_older(editor, tmp_path, "0.5.0", "chat_rows")
    resumed = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path)
    assert resumed.config.chat_rows is False
