"""The `lemoe` command end to end on a tiny model saved as a local directory."""

from __future__ import annotations

import json
import re

import pytest

from conftest import make_model, records, tiny_tokenizer
from lemoe.cli import main


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records(6)))
    return path


def test_edit_info_generate_rollback(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = ["--data", str(data_file), "--out", str(out), "--model", str(model_dir), "--batch-size", "2",
            "--layer", "1", "--max-steps", "5"]
    assert main(["edit", *args]) == 0
    printed = capsys.readouterr().out
    assert "edits in adapter" in printed and "experts" in printed
    assert len((out / "edits.jsonl").read_text().splitlines()) == 6

    assert main(["edit", *args]) == 0  # a rerun resumes: nothing left to do
    assert "resumed: 6 edits" in capsys.readouterr().out

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^experts\s+3$", info, re.M) and re.search(r"^edits\s+6$", info, re.M)
    assert records(6)[5].prompt[:30] in info

    assert main(["generate", "--adapter", str(out), "--model", str(model_dir), "--max-new-tokens", "3",
                 "--compare", records(1)[0].prompt]) == 0
    assert "base model" in capsys.readouterr().out

    assert main(["rollback", str(out), "--batches", "2", "--model", str(model_dir)]) == 0
    assert "1 experts and 2 edits remain" in capsys.readouterr().out
    assert len((out / "edits.jsonl").read_text().splitlines()) == 2


def test_bad_input_gives_a_clear_error_and_exit_code(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "Where was Paris born?", "target": "Lyon"}, {"target": "x"}]))
    code = main(["edit", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.json: record 1: missing field 'prompt'" in err
    assert not (tmp_path / "o").exists()
    code = main(["edit", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", str(model_dir), "--layer", "7"])
    assert code == 2
    code = main(["info", str(tmp_path / "missing")])
    assert code == 2 and "no such adapter directory" in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "lemoe edit --data" in text and "rollback" in text
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "resumes where it stopped" in " ".join(capsys.readouterr().out.split())


def test_bench_order_sensitivity(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "orders"
    code = main(["bench", "--data", str(data_file), "--T", "6", "--batch-size", "2", "--order-sensitivity", "2",
                 "--no-generative", "--out", str(out), "--model", str(model_dir), "--layer", "1", "--max-steps", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random_seed0" in printed and "random_seed1" in printed and "cluster" in printed
    result = json.loads((out / "order_sensitivity.json").read_text())
    assert [r["run"] for r in result["runs"]] == ["random_seed0", "random_seed1", "cluster"]
    assert (out / "order_sensitivity.png").exists() and (out / "cluster" / "summary.json").exists()


def test_bench_compares_methods(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    overrides = tmp_path / "methods.json"
    overrides.write_text(json.dumps({"grace": {"radius": 2.0}, "wise": {"shard_edits": 2}}))
    code = main(["bench", "--data", str(data_file), "--T", "6", "--batch-size", "2", "--method",
                 "lemoe,ft-l,memoe,grace,wise", "--method-config", str(overrides), "--out", str(out),
                 "--model", str(model_dir), "--layer", "1", "--max-steps", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert all(m in printed for m in ("lemoe", "ft-l", "memoe", "grace", "wise")) and "adapter bytes" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["methods"]["grace"]["config"]["radius"] == 2.0
    assert result["methods"]["wise"]["config"]["shard_edits"] == 2
    assert all(s["config"]["layer"] == 1 for s in result["methods"].values())
    assert (out / "comparison.md").exists() and (out / "forgetting_curves.png").exists()


def test_bench_refuses_an_unknown_method(model_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown --method rome"):
        main(["bench", "--data", str(data_file), "--method", "lemoe,rome", "--out", str(tmp_path / "x"),
              "--model", str(model_dir)])


def test_version_names_every_dependency(capsys):
    import transformers

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("lemoe ") and f"transformers {transformers.__version__}" in out
    for name in ("python", "torch", "tokenizers", "safetensors", "git commit"):
        assert f"  {name} " in out, name
