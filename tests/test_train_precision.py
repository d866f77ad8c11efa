"""`train_precision="bfloat16"`: training steps run under bfloat16 autocast, and full precision decides the stop."""

from __future__ import annotations

import pytest
import torch

from conftest import expert_says, make_model, records, save_as_older, tiny_config
from lemoe import LEMoEConfig, LifelongEditor, training
from lemoe.cli import build_parser
from lemoe.encoding import encode_answer


def _record_precision(monkeypatch: pytest.MonkeyPatch, fake_done_under_autocast: bool = False) -> list[bool]:
    """Wrap training's answer logits: note whether each pass ran under autocast; optionally make every autocast
    pass look answered (the targets far ahead), so only a full-precision pass can tell the truth."""
    seen: list[bool] = []
    real = training._answer_logits

    def wrapped(model, parts, replay):  # type: ignore[no-untyped-def]
        under = torch.is_autocast_enabled("cpu")
        seen.append(under)
        logits = real(model, parts, replay)
        if under and fake_done_under_autocast:
            targets = torch.cat([part.targets for part, _ in parts])
            logits = logits + 1e4 * torch.nn.functional.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        return logits

    monkeypatch.setattr(training, "_answer_logits", wrapped)
    return seen


def test_bfloat16_steps_run_under_autocast_and_the_stop_is_decided_at_full_precision(tokenizer, monkeypatch):
    seen = _record_precision(monkeypatch)
    recs = records(2)
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=150, train_precision="bfloat16"))
    report = editor.edit(recs)
    assert seen[0] and not seen[-1]  # trained in bfloat16, judged in float32
    assert seen.count(False) >= 1 and len(seen) >= report.steps + 1
    assert report.train_accuracy == [1.0, 1.0]
    for record in recs:  # the reported accuracy is full precision's: the expert really answers
        prompt = tokenizer(record.prompt)["input_ids"]
        assert expert_says(editor, tokenizer, prompt, encode_answer(tokenizer, record.target))


def test_when_full_precision_disagrees_with_the_autocast_stop_training_goes_on_at_full_precision(tokenizer,
                                                                                                monkeypatch):
    seen = _record_precision(monkeypatch, fake_done_under_autocast=True)
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=150, train_precision="bfloat16"))
    report = editor.edit(records(2))
    # every autocast pass looked answered, so autocast ran only until min_steps; the rest was float32
    assert seen[: editor.config.min_steps + 1] == [True] * (editor.config.min_steps + 1)
    assert not any(seen[editor.config.min_steps + 1 :])
    assert report.steps > editor.config.min_steps  # the fake stop was not taken
    assert report.train_accuracy == [1.0, 1.0]


def test_float32_never_autocasts(tokenizer, monkeypatch):
    seen = _record_precision(monkeypatch)
    LifelongEditor(make_model("llama"), tokenizer, tiny_config()).edit(records(2))
    assert seen and not any(seen)


def test_train_precision_is_validated_set_by_the_cli_and_defaults_to_float32_for_older_adapters(tokenizer,
                                                                                                 tmp_path):
    assert LEMoEConfig().train_precision == "float32"
    for bad in ("fp16", "bf16", None, 16):
        with pytest.raises(ValueError, match="train_precision"):
            LEMoEConfig(train_precision=bad)  # type: ignore[arg-type]
    args = build_parser().parse_args(["bench", "--data", "x.json", "--out", "o", "--train-precision", "bfloat16"])
    assert args.train_precision == "bfloat16"
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(train_precision="bfloat16"))
    editor.edit(records(2))
    save_as_older(editor, tmp_path, "0.9.0", "train_precision")
    resumed = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path)
    assert resumed.config.train_precision == "float32"


@pytest.mark.parametrize("native", [False, True, None])
def test_bfloat16_on_a_cpu_without_bfloat16_units_is_warned_about(tokenizer, monkeypatch, caplog, native):
    import lemoe.editor

    monkeypatch.setattr(lemoe.editor, "native_bfloat16_cpu", lambda: native)
    with caplog.at_level("WARNING", logger="lemoe"):
        LifelongEditor(make_model("llama"), tokenizer, tiny_config(train_precision="bfloat16"))
    warned = [r.getMessage() for r in caplog.records if "bfloat16 units" in r.getMessage()]
    assert bool(warned) == (native is False)  # unknown (None): no claim either way
    caplog.clear()
    with caplog.at_level("WARNING", logger="lemoe"):
        LifelongEditor(make_model("llama"), tokenizer, tiny_config())  # float32: nothing to warn about
    assert not [r for r in caplog.records if "bfloat16 units" in r.getMessage()]
