"""`stop_confidence`: training stops once every answer token is the argmax with at least that probability."""

from __future__ import annotations

import pytest
import torch

from conftest import expert_says, make_model, records, save_as_older, tiny_config
from lemoe import LEMoEConfig, LifelongEditor
from lemoe.cli import build_parser
from lemoe.encoding import encode_answer


@torch.no_grad()
def _lowest_answer_probability(editor, tokenizer, recs) -> float:  # type: ignore[no-untyped-def]
    """The smallest teacher-forced probability of any answer token, the batch's expert forced on."""
    lowest = 1.0
    for record in recs:
        prompt, answer = tokenizer(record.prompt)["input_ids"], encode_answer(tokenizer, record.target)
        ids = torch.tensor([prompt + answer])
        with editor.adaptor.forced_route(torch.tensor([0])):
            logits = editor.model(input_ids=ids).logits[0]  # (T, V)
        probs = torch.softmax(logits[len(prompt) - 1 : -1], dim=-1)  # (A, V): each predicts the next answer token
        lowest = min(lowest, float(probs[torch.arange(len(answer)), torch.tensor(answer)].min()))
    return lowest


def _sharp_model():  # type: ignore[no-untyped-def]
    """A tiny model whose LM head can reach a probability near 1: the random one's logits span too little
    for any token of its 320 to pass 0.1, whatever the expert does (its hidden state is normalised first)."""
    model = make_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


def test_a_confidence_bar_trains_until_every_answer_token_reaches_it(tokenizer):
    recs = records(3)
    plain = LifelongEditor(_sharp_model(), tokenizer, tiny_config(max_steps=200, min_steps=0, stop_confidence=0))
    sure = LifelongEditor(_sharp_model(), tokenizer, tiny_config(max_steps=200, min_steps=0, stop_confidence=0.95))
    plain_report, sure_report = plain.edit(recs), sure.edit(recs)
    assert plain_report.train_accuracy == sure_report.train_accuracy == [1.0] * 3
    assert sure_report.steps > plain_report.steps  # the argmax came before the bar
    sure_lowest, plain_lowest = (_lowest_answer_probability(e, tokenizer, recs) for e in (sure, plain))
    assert sure_lowest >= 0.94, sure_lowest  # 0.95 in the training pass; scored a row at a time it may differ slightly
    assert plain_lowest < 0.9, plain_lowest


def test_stop_confidence_is_validated_set_by_the_cli_and_zero_for_older_adapters(tokenizer, tmp_path):
    assert LEMoEConfig().stop_confidence == 0.9
    for bad in (1.0, -0.1, "0.9", True, None):
        with pytest.raises(ValueError, match="stop_confidence"):
            LEMoEConfig(stop_confidence=bad)  # type: ignore[arg-type]
    args = build_parser().parse_args(["bench", "--data", "x.json", "--out", "o", "--stop-confidence", "0.5"])
    assert args.stop_confidence == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--data", "x.json", "--out", "o", "--stop-confidence", "1"])
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config(stop_confidence=0.5))
    editor.edit(records(2))
    save_as_older(editor, tmp_path, "0.10.0", "stop_confidence")
    assert LifelongEditor.open(make_model("llama"), tokenizer, tmp_path).config.stop_confidence == 0.0


def test_a_bar_never_met_puts_back_the_last_parameters_where_every_token_was_the_argmax(tokenizer, monkeypatch):
    """On this tiny GPT-2 the bar is out of reach and training past the argmax loses it by the cap (without the
    put-back, one edit ended at 0.67): the last pass scores the parameters restored, and every edit holds."""
    from lemoe import training

    passes: list[bool] = []  # whether each pass had every answer token right
    real = training._answer_logits

    def wrapped(model, parts, replay):  # type: ignore[no-untyped-def]
        logits = real(model, parts, replay)
        targets = torch.cat([part.targets for part, _ in parts])
        passes.append(bool((logits.argmax(dim=-1) == targets).all()))
        return logits

    monkeypatch.setattr(training, "_answer_logits", wrapped)
    recs = records(3)
    editor = LifelongEditor(make_model("gpt2"), tokenizer, tiny_config(max_steps=150, stop_confidence=0.9))
    report = editor.edit(recs)
    assert report.steps == 150  # the bar was never met
    assert passes[-2] is False and passes[-1] is True  # lost at the cap, then put back
    assert report.train_accuracy == [1.0, 1.0, 1.0]
    for record in recs:
        assert expert_says(editor, tokenizer, tokenizer(record.prompt)["input_ids"],
                           encode_answer(tokenizer, record.target))
