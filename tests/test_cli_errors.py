"""The CLI with a user's mistakes (issue 14): one line naming the problem and exit 2, never a traceback,
and nothing saved is lost."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_model, records, tiny_tokenizer
from lemoe import cli
from lemoe.cli import main
from lemoe.persistence import CONFIG_NAME, EDITS_NAME, WEIGHTS_NAME


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records(4)))
    return path


def _edit_args(data_file, out, model_dir, *extra):
    return ["edit", "--data", str(data_file), "--out", str(out), "--model", str(model_dir), "--batch-size", "2",
            "--layer", "1", "--max-steps", "3", *extra]


@pytest.mark.parametrize("argv", [
    ["edit", "--data", "x", "--out", "o", "--threads", "0"],
    ["edit", "--data", "x", "--out", "o", "--threads", "-1"],
    ["edit", "--data", "x", "--out", "o", "--limit", "0"],
    ["edit", "--data", "x", "--out", "o", "--limit", "-5"],
    ["edit", "--data", "x", "--out", "o", "--lr", "inf"],
    ["edit", "--data", "x", "--out", "o", "--lr", "nan"],
    ["edit", "--data", "x", "--out", "o", "--lr", "0"],
    ["edit", "--data", "x", "--out", "o", "--lora-rank", "0"],
    ["info", "a", "--last", "-1"],
    ["rollback", "a", "--batches", "-2"],
    ["bench", "--data", "x", "--out", "o", "--T", "0"],
])
def test_out_of_range_numbers_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "out of range" in err or "is not" in err


def test_help_states_the_configs_own_defaults(capsys):
    from lemoe import LEMoEConfig

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"rank of lora experts (default: {LEMoEConfig().lora_rank})" in text


def test_a_cuda_device_without_a_gpu_is_one_line(model_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(_edit_args(data_file, tmp_path / "o", model_dir, "--device", "cuda"))
    assert code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


def test_a_broken_model_directory_is_named(tmp_path, data_file, model_dir, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    assert main(_edit_args(data_file, tmp_path / "o1", garbage)) == 2
    assert f"{garbage}: cannot load a causal LM" in capsys.readouterr().err
    (model_dir / "model.safetensors").unlink()
    assert main(_edit_args(data_file, tmp_path / "o2", model_dir)) == 2
    assert f"{model_dir}: cannot load" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_out_under_a_regular_file_fails_before_training(model_dir, data_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_edit_args(data_file, blocker / "adapter", model_dir)) == 2
    assert "file" in capsys.readouterr().err
    assert main(_edit_args(data_file, blocker, model_dir)) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_a_partial_adapter_directory_is_never_overwritten_without_asking(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(_edit_args(data_file, out, model_dir)) == 0
    (out / WEIGHTS_NAME).unlink()  # a partial copy: config and edit log, no weights
    log = (out / EDITS_NAME).read_text()
    assert main(_edit_args(data_file, out, model_dir, "--limit", "2")) == 2
    err = capsys.readouterr().err
    assert "no adapter_model.safetensors" in err and "--overwrite" in err
    assert (out / EDITS_NAME).read_text() == log and (out / CONFIG_NAME).exists()
    assert main(_edit_args(data_file, out, model_dir, "--limit", "2", "--overwrite")) == 0
    assert len((out / EDITS_NAME).read_text().splitlines()) == 2


def test_a_record_too_long_is_named_by_its_place_before_any_batch_trains(model_dir, tmp_path, capsys):
    data = tmp_path / "long.json"
    items = [r.to_dict() for r in records(4)]
    items[3]["prompt"] = "word " * 300
    data.write_text(json.dumps(items))
    out = tmp_path / "adapter"
    assert main(_edit_args(data, out, model_dir)) == 2
    assert f"{data}: record 3: prompt + target is" in capsys.readouterr().err
    assert not (out / WEIGHTS_NAME).exists()


def test_a_record_whose_prefixed_row_is_too_long_is_named_before_any_batch_trains(model_dir, tmp_path, capsys):
    """With --prefix-rows the check covers the rows the edit will train, not the plain prompt alone."""
    from lemoe.editor import prefixes_for

    tok, limit = tiny_tokenizer(), 128
    items = [r.to_dict() for r in records(4)]
    words = 1
    target = len(tok(" " + items[3]["target"])["input_ids"])
    while True:  # a prompt whose plain row fits and whose prefixed row does not
        prompt = " ".join(["word"] * words)
        plain = len(tok(prompt)["input_ids"]) + target
        prefixed = len(tok(f"{prefixes_for(3, 1, 1)[0][0]} {prompt}")["input_ids"]) + target
        if plain <= limit < prefixed:
            break
        assert plain <= limit, "no prompt length separates the two rows"
        words += 1
    items[3]["prompt"] = prompt
    data = tmp_path / "long.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "adapter"
    assert main(_edit_args(data, out, model_dir, "--prefix-rows", "1")) == 2
    err = capsys.readouterr().err
    assert f"{data}: record 3, after the sentence" in err and "longer than the model's context of 128" in err
    assert not (out / WEIGHTS_NAME).exists()
    assert main(_edit_args(data, tmp_path / "plain", model_dir)) == 0  # without prefix rows it fits


def test_conflicting_duplicates_warn_naming_both_records_or_fail_when_strict(model_dir, tmp_path, capsys, caplog):
    data = tmp_path / "dup.jsonl"
    first, second = records(2)
    clash = {**first.to_dict(), "target": "Marseille"}
    data.write_text("".join(json.dumps(d) + "\n" for d in (first.to_dict(), second.to_dict(), clash)))
    assert main(_edit_args(data, tmp_path / "strict", model_dir, "--strict")) == 2
    assert f"{data}: line 3: prompt" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        assert main(_edit_args(data, tmp_path / "lenient", model_dir)) == 0
    assert f"{data}: line 3" in caplog.text and f"{data}: line 1" in caplog.text


def test_info_verifies_and_refuses_damage_and_generate_names_its_base_model(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(_edit_args(data_file, out, model_dir)) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--verify"]) == 0
    assert "digests match" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "Hello"]) == 0
    assert f"base model: {model_dir}" in capsys.readouterr().err
    weights = out / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0xFF
    weights.write_bytes(bytes(data))
    for argv in (["info", str(out)], ["generate", "--adapter", str(out), "Hi"],
                 ["rollback", str(out), "--batches", "1"]):
        assert main(argv) == 2
        assert "does not match its stored digest" in capsys.readouterr().err
    assert weights.read_bytes() == bytes(data)  # rollback did not re-save the damaged expert


def test_old_adapters_get_digests_on_request(model_dir, data_file, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "adapter"
    assert main(_edit_args(data_file, out, model_dir)) == 0
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    del metadata["digests"], metadata["state_digest"]
    save_file(tensors, str(out / WEIGHTS_NAME), metadata=metadata)
    capsys.readouterr()
    assert main(["info", str(out), "--verify"]) == 0
    assert "digests absent" in capsys.readouterr().out
    assert main(["info", str(out), "--verify", "--add-digests"]) == 0
    assert "added tensor digests" in capsys.readouterr().out
    assert main(["info", str(out), "--verify"]) == 0
    assert "digests match" in capsys.readouterr().out


def test_an_internal_error_is_one_line_unless_debugging_and_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_info", broken)
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["info", str(tmp_path), "--debug"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_setup", interrupted)
    assert main(["info", str(tmp_path)]) == 130


def test_the_command_starts_without_torch_so_ctrl_c_at_start_up_is_clean():
    import subprocess
    import sys

    code = "import sys, lemoe.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
