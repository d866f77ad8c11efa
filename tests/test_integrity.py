"""Nothing saved is ever silently wrong (issue 14): digests, finite values, metadata schema, reads that
never write, all-or-nothing edits and rollbacks, one edit at a time."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import logits_of, make_model, records, tiny_config
from lemoe import AdapterError, LifelongEditor
from lemoe import persistence
from lemoe.metrics import greedy_completions
from lemoe.persistence import CONFIG_NAME, EDITS_NAME, WEIGHTS_NAME


def _saved(tokenizer, directory: Path, batches: int = 1) -> LifelongEditor:
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config())
    for b in range(batches):
        editor.edit(records(2, offset=2 * b))
    editor.save(directory)
    return editor


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def _rewrite(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def _state_edit(directory: Path, change) -> None:
    tensors, metadata = _read(directory)
    state = json.loads(metadata["state"])
    change(state)
    metadata["state"] = json.dumps(state)
    metadata.pop("state_digest")  # as a hand edit would: the schema must catch it
    _rewrite(directory, tensors, metadata)


def test_a_flipped_byte_inside_a_tensor_is_refused_naming_the_tensor(tokenizer, tmp_path):
    _saved(tokenizer, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # the last tensor's bytes: the header stays valid
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=r"tensor '.+' does not match its stored digest"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)


def test_a_changed_metadata_value_is_refused(tokenizer, tmp_path):
    _saved(tokenizer, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    changed = data.replace(b'\\"lr\\": 0.05', b'\\"lr\\": 0.06', 1)  # inside the JSON string
    assert changed != data
    weights.write_bytes(changed)
    with pytest.raises(AdapterError, match="metadata does not match its stored digest"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)


def test_an_adapter_without_digests_loads_with_a_warning_that_says_how_to_add_them(tokenizer, tmp_path, caplog):
    editor = _saved(tokenizer, tmp_path)
    expected = logits_of(editor.model, tokenizer, ["Where was Paris 0 born?"])
    tensors, metadata = _read(tmp_path)
    del metadata["digests"], metadata["state_digest"]  # as lemoe 0.5 wrote it
    _rewrite(tmp_path, tensors, metadata)
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        fresh = make_model("llama")
        LifelongEditor.load(fresh, tokenizer, tmp_path)
    assert "no tensor digests" in caplog.text and "--add-digests" in caplog.text
    assert torch.equal(logits_of(fresh, tokenizer, ["Where was Paris 0 born?"]), expected)


def test_non_finite_tensors_are_refused_on_load_and_on_save(tokenizer, tmp_path):
    editor = _saved(tokenizer, tmp_path)
    tensors, metadata = _read(tmp_path)
    name = next(k for k in tensors if k.startswith("router.") and tensors[k].is_floating_point()
                and tensors[k].numel())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    del metadata["digests"]  # a file whose NaN came with it: the digest check alone would not catch it
    _rewrite(tmp_path, tensors, metadata)
    with pytest.raises(AdapterError, match=f"tensor '{name}' holds NaN"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)
    with torch.no_grad():
        next(editor.adaptor.experts[0].parameters()).fill_(float("inf"))
    with pytest.raises(AdapterError, match="refusing to save"):
        editor.save(tmp_path / "other")
    assert not (tmp_path / "other" / WEIGHTS_NAME).exists()


def test_a_diverging_edit_adds_nothing(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="positive finite"):
        tiny_config(lr=float("inf"))
    from lemoe import editor as editor_module

    real_train = editor_module.train_expert

    def diverging(model, layers, layer_idx, adaptor, expert_id, *args):
        result = real_train(model, layers, layer_idx, adaptor, expert_id, *args)
        with torch.no_grad():
            next(adaptor.experts[expert_id].parameters()).view(-1)[0] = float("nan")
        return result

    editor = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path, tiny_config(max_steps=5))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(editor_module, "train_expert", diverging)
    with pytest.raises(ValueError, match="training diverged"):
        editor.edit(records(2))
    monkeypatch.undo()
    editor.config.lr = 1e38  # so large that the optimiser itself fails
    with pytest.raises(RuntimeError):
        editor.edit(records(2))
    assert editor.num_experts == 0 and editor.edits == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("change, field", [
    (lambda s: s.update(config=None), "config"),
    (lambda s: s.update(layer="1"), "layer"),
    (lambda s: s.update(num_experts=-1), "num_experts"),
    (lambda s: s.update(fingerprint=[float("nan")]), "fingerprint"),
    (lambda s: s.update(edits={}), "edits"),
    (lambda s: s["edits"][0].pop("batch"), "batch"),
    (lambda s: s["edits"][0].update(expert=7), "expert 7 does not exist"),
    (lambda s: s["edits"][1].update(prompt=None), "prompt"),
    (lambda s: s["config"].update(layer=4), "does not fit this model"),  # found by the fuzzer
    (lambda s: s["config"].update(lora_rank="4"), "does not fit this model"),
])
def test_metadata_of_the_wrong_shape_is_refused_naming_the_field(tokenizer, tmp_path, change, field):
    _saved(tokenizer, tmp_path)
    _state_edit(tmp_path, change)
    with pytest.raises(AdapterError, match=field):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)


def test_metadata_that_is_not_an_object_is_refused(tokenizer, tmp_path):
    _saved(tokenizer, tmp_path)
    tensors, metadata = _read(tmp_path)
    for text in ("[]", "{}", "null"):
        metadata["state"] = text
        metadata.pop("state_digest", None)
        _rewrite(tmp_path, tensors, metadata)
        with pytest.raises(AdapterError):
            LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)


def test_claimed_sizes_are_refused_before_anything_is_allocated(tokenizer, tmp_path, monkeypatch):
    _saved(tokenizer, tmp_path)
    _state_edit(tmp_path, lambda s: s.update(num_experts=3000))
    from lemoe.layer import LEMoELayer

    made = []
    original = LEMoELayer.new_expert
    monkeypatch.setattr(LEMoELayer, "new_expert", lambda self: made.append(1) or original(self))
    with pytest.raises(AdapterError, match="claims 3000 experts"):
        LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)
    assert made == []
    with pytest.raises(ValueError, match="exceeds the model's width"):
        LifelongEditor(make_model("llama"), tokenizer, tiny_config(lora_rank=50_000))


def test_reading_never_writes(tokenizer, tmp_path, monkeypatch):
    _saved(tokenizer, tmp_path)
    (tmp_path / EDITS_NAME).write_text("")  # stale side files, as after a kill
    (tmp_path / CONFIG_NAME).write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(persistence, "_atomic_write_bytes", refuse)
    state, _ = persistence.load_adapter(tmp_path)
    assert len(state.edits) == 2
    assert LifelongEditor.load(make_model("llama"), tokenizer, tmp_path).num_experts == 1
    from lemoe.cli import main

    assert main(["info", str(tmp_path), "--verify"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_save_leaves_the_editor_as_before_so_a_retry_is_clean(tokenizer, tmp_path, monkeypatch):
    editor = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path, tiny_config())
    editor.edit(records(2))
    real = persistence._atomic_write_bytes
    monkeypatch.setattr(persistence, "_atomic_write_bytes", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        editor.edit(records(2, offset=2))
    assert editor.num_experts == 1 and len(editor.edits) == 2
    with pytest.raises(OSError, match="disk full"):
        editor.rollback(1)
    assert editor.num_experts == 1 and len(editor.edits) == 2
    monkeypatch.setattr(persistence, "_atomic_write_bytes", real)
    editor.edit(records(2, offset=2))  # the retry
    loaded = LifelongEditor.load(make_model("llama"), tokenizer, tmp_path)
    assert loaded.num_experts == 2 and [e["expert"] for e in loaded.edits] == [0, 0, 1, 1]


def test_stale_temporary_files_are_removed_by_the_next_save(tokenizer, tmp_path):
    editor = _saved(tokenizer, tmp_path)
    leftover = tmp_path / f".{WEIGHTS_NAME}.abc123.tmp"
    leftover.write_bytes(b"half a file")
    editor.save(tmp_path)
    assert not leftover.exists() and (tmp_path / WEIGHTS_NAME).exists()


def test_concurrent_edits_are_serialised(tokenizer):
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=10))
    errors: list[BaseException] = []

    def edit(offset: int) -> None:
        try:
            editor.edit(records(2, offset=offset))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=edit, args=(offset,)) for offset in (0, 2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and editor.num_experts == 3
    by_expert = {e["expert"]: set() for e in editor.edits}
    for e in editor.edits:
        by_expert[e["expert"]].add(e["prompt"])
    assert sorted(by_expert) == [0, 1, 2] and {frozenset(v) for v in by_expert.values()} == {
        frozenset(r.prompt for r in records(2, offset=o)) for o in (0, 2, 4)}


def test_generation_during_an_edit_sees_the_old_or_the_new_experts_never_a_half_made_one(tokenizer):
    model = make_model("llama")
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=30))
    editor.edit(records(2))
    prompts = [r.prompt for r in records(4)]
    before = greedy_completions(model, tokenizer, prompts, 4)
    seen: list[list[list[int]]] = []
    started = threading.Event()

    def generate() -> None:
        started.set()
        while worker.is_alive():
            seen.append(greedy_completions(model, tokenizer, prompts, 4))

    worker = threading.Thread(target=lambda: (started.wait(), editor.edit(records(2, offset=2))))
    reader = threading.Thread(target=generate)
    worker.start()
    reader.start()
    worker.join()
    reader.join()
    after = greedy_completions(model, tokenizer, prompts, 4)
    assert before != after  # the edit changed something, so the check below is not vacuous
    assert seen and all(s in (before, after) for s in seen)


def test_open_refuses_a_directory_with_lemoe_files_but_no_weights(tokenizer, tmp_path):
    _saved(tokenizer, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    log = (tmp_path / EDITS_NAME).read_text()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        LifelongEditor.open(make_model("llama"), tokenizer, tmp_path, tiny_config())
    assert (tmp_path / EDITS_NAME).read_text() == log
    editor = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path, tiny_config(), overwrite=True)
    editor.edit(records(2))
    assert len((tmp_path / EDITS_NAME).read_text().splitlines()) == 2


def test_generation_runs_while_an_expert_trains_and_does_not_see_it(tokenizer, monkeypatch):
    from lemoe import editor as editor_module

    model = make_model("llama")
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=30))
    editor.edit(records(2))
    prompts = [r.prompt for r in records(4)]
    before = greedy_completions(model, tokenizer, prompts, 4)
    training, generated = threading.Event(), threading.Event()
    real_train = editor_module.train_expert
    outcome: dict[str, object] = {}

    def train_after_a_generation(*args):
        training.set()
        outcome["generated_during_training"] = generated.wait(timeout=60)
        return real_train(*args)

    monkeypatch.setattr(editor_module, "train_expert", train_after_a_generation)
    worker = threading.Thread(target=lambda: editor.edit(records(2, offset=2)))
    worker.start()
    assert training.wait(timeout=60)
    outcome["seen"] = greedy_completions(model, tokenizer, prompts, 4)  # not blocked by the edit
    generated.set()
    worker.join()
    assert outcome["generated_during_training"] is True
    assert outcome["seen"] == before  # the expert in training was hidden from routing
    assert editor.num_experts == 2 and greedy_completions(model, tokenizer, prompts, 4) != before
