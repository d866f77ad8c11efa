"""Config validation, the edit-file reader, architecture detection: bad input gets a clear error."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import make_model, tiny_config
from lemoe import DataError, EditRecord, LEMoEConfig, LifelongEditor, read_edits
from lemoe.models import find_layout, load_model


def test_config_round_trip_and_validation(caplog):
    config = LEMoEConfig(layer=3, expert="ffn", top_k=2, lr=1e-3)
    assert LEMoEConfig.from_json(config.to_json()) == config
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        loaded = LEMoEConfig.from_dict({**config.to_dict(), "from_the_future": 1})
    assert loaded == config and "from_the_future" in caplog.text
    for bad, match in [
        (dict(expert="moe"), "expert must be one of"),
        (dict(layer=-1), "layer must be"),
        (dict(top_k=0), "top_k must be a positive int"),
        (dict(lr=0), "lr must be a positive finite number"),
        (dict(pooling="max"), "pooling must be one of"),
        (dict(min_steps=50, max_steps=10), "min_steps"),
        (dict(route_margin=1.5), "route_margin"),
        (dict(lora_rank=True), "lora_rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            LEMoEConfig(**bad)


def test_layer_out_of_range_names_the_depth(tokenizer):
    with pytest.raises(ValueError, match="layer 9 is out of range: the model has 4 decoder layers"):
        LifelongEditor(make_model("llama"), tokenizer, tiny_config(layer=9))


def test_default_layer_is_two_thirds_of_the_depth():
    assert LEMoEConfig().resolve_layer(30) == 20
    assert LEMoEConfig().resolve_layer(4) == 3


def test_record_validation():
    with pytest.raises(DataError, match="empty 'target'"):
        EditRecord(prompt="The capital of France is", target="  ")
    with pytest.raises(DataError, match="empty 'prompt'"):
        EditRecord(prompt="", target="Paris")
    with pytest.raises(DataError, match="only one of locality_prompt"):
        EditRecord(prompt="a", target="b", locality_prompt="c")
    with pytest.raises(DataError, match="must be a string"):
        EditRecord(prompt="a", target=3)  # type: ignore[arg-type]


def test_reader_accepts_json_and_jsonl(tmp_path):
    rows = [{"prompt": "The capital of France is", "target": "Lyon", "rephrase": "France's capital is"},
            {"prompt": "Water boils at", "target": "50 degrees", "source": "mine"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("a.json", "a.jsonl"):
        edits = read_edits(tmp_path / name)
        assert [e.target for e in edits] == ["Lyon", "50 degrees"]
        assert edits[1].extra == {"source": "mine"}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"target": "x"}]', r"record 0: missing field 'prompt'"),
        ('[{"prompt": "a", "target": "b"}, {"prompt": "a"}]', r"record 1: missing field 'target'"),
        ('[{"prompt": "a", "target": ""}]', r"record 0: .*empty 'target'"),
        ('[1, 2]', r"record 0: expected a JSON object"),
        ('[{"prompt": "a", "target": "b"', r"not valid JSON"),
        ('{"prompt": "a", "target": "b"}\n{"prompt": ', r"line 2 is not valid JSON"),
        ('', r"contains no edit records"),
        ('[]', r"contains no edit records"),
    ],
)
def test_reader_errors_name_file_and_record(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        read_edits(path)
    assert "bad.json" in str(info.value)


def test_missing_file():
    with pytest.raises(DataError, match="no such file"):
        read_edits("/nonexistent/edits.json")


def test_unknown_architecture_lists_module_names():
    import torch.nn as nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="unsupported architecture Odd.*Module names found: blocks, blocks.N"):
        find_layout(Odd())


def test_load_model_from_a_local_directory(tmp_path, tokenizer):
    model = make_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    assert tok("the quick brown fox")["input_ids"] == tokenizer("the quick brown fox")["input_ids"]


def test_load_model_refuses_hub_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot download from a model hub"):
        load_model("meta-llama/Llama-2-7b-hf")


def test_load_model_refuses_an_unknown_dtype(tmp_path, tokenizer):
    make_model("gpt2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_model(tmp_path, dtype="float33")
