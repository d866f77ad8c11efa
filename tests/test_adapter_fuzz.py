"""1,000 corrupted adapter files per run (issue 14): bytes flipped anywhere in the weights file, and metadata
fields of every wrong type. Each ends in a clean refusal (AdapterError) or a load identical to the
original: never another exception, never a silently different adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_model, records, tiny_config, tiny_tokenizer
from lemoe import AdapterError, LifelongEditor
from lemoe.persistence import WEIGHTS_NAME, load_adapter

_CACHE: dict[str, object] = {}


def _original(root: Path) -> tuple[Path, bytes, object, dict[str, torch.Tensor]]:
    """One small saved adapter (2 experts), made once per run."""
    if "dir" not in _CACHE:
        directory = root / "original"
        editor = LifelongEditor(make_model("llama"), tiny_tokenizer(), tiny_config(max_steps=3))
        editor.edit(records(2))
        editor.edit(records(2, offset=2))
        editor.save(directory)
        state, tensors = load_adapter(directory)
        _CACHE.update(dir=directory, bytes=(directory / WEIGHTS_NAME).read_bytes(), state=state, tensors=tensors)
    return _CACHE["dir"], _CACHE["bytes"], _CACHE["state"], _CACHE["tensors"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return _original(tmp_path_factory.mktemp("fuzz"))


def _same(state_a, tensors_a, state_b, tensors_b) -> bool:
    return state_a == state_b and tensors_a.keys() == tensors_b.keys() and all(
        tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3))
def test_flipped_bytes_anywhere_are_refused_or_harmless(original, tmp_path_factory, flips):
    directory, data, state, tensors = original
    damaged = bytearray(data)
    for where, mask in flips:
        damaged[int(where * len(damaged))] ^= mask
    target = tmp_path_factory.mktemp("flip")
    (target / WEIGHTS_NAME).write_bytes(bytes(damaged))
    try:
        loaded_state, loaded_tensors = load_adapter(target)
    except AdapterError:
        return
    assert _same(state, tensors, loaded_state, loaded_tensors)  # e.g. a space in the header became a tab


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                          st.integers(), max_size=2))
FIELDS = ["config", "base_model", "fingerprint", "layer", "num_experts", "edits", "lemoe_version", "method"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_metadata_fields_of_every_wrong_type_are_refused_by_a_full_load(original, tmp_path_factory, data):
    directory, _, _, _ = original
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    state = json.loads(metadata["state"])
    where = data.draw(st.sampled_from(FIELDS + ["config.*", "edits.*", "edits.*.*"]))
    if where == "config.*":
        state["config"][data.draw(st.sampled_from(sorted(state["config"])))] = data.draw(WRONG)
    elif where == "edits.*":
        state["edits"][data.draw(st.integers(0, len(state["edits"]) - 1))] = data.draw(WRONG)
    elif where == "edits.*.*":
        edit = state["edits"][data.draw(st.integers(0, len(state["edits"]) - 1))]
        edit[data.draw(st.sampled_from(sorted(edit)))] = data.draw(WRONG)
    else:
        state[where] = data.draw(WRONG)
    metadata["state"] = json.dumps(state)
    metadata.pop("state_digest")  # a deliberate edit: only the schema stands between it and a wrong load
    target = tmp_path_factory.mktemp("meta")
    save_file(tensors, str(target / WEIGHTS_NAME), metadata=metadata)
    model = _MODEL.setdefault("model", make_model("llama"))
    try:
        editor = LifelongEditor.load(model, tiny_tokenizer(), target)
    except AdapterError:
        return
    editor.unload()  # it loaded: the changed value must have been one that does not matter to routing


_MODEL: dict[str, object] = {}
