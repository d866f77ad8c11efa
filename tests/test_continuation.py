"""Training on what follows the target (LEMoEConfig.continuation_tokens): the expert learns to hand the
text back to the unedited model after the answer, so one fact does not run into another (issue 12)."""

from __future__ import annotations

import pytest

from conftest import make_model, records, tiny_config
from lemoe import LEMoEConfig, LifelongEditor
from lemoe.encoding import answer_logits, encode_answer, encode_pairs
from lemoe.metrics import greedy_completions


def test_continuations_are_appended_as_following_targets(tokenizer):
    batch = encode_pairs(tokenizer, ["Where was Paris born?", "Who wrote the fox?"], ["Tokyo", "the river"],
                         continuations=[[5, 6, 7], [8]])
    answers = [encode_answer(tokenizer, "Tokyo"), encode_answer(tokenizer, "the river")]
    assert batch.targets.tolist() == answers[0] + [5, 6, 7] + answers[1] + [8]
    assert batch.follows.tolist() == [False] * len(answers[0]) + [True] * 3 + [False] * len(answers[1]) + [True]
    assert batch.answer_only().tolist() == [not f for f in batch.follows.tolist()]
    # cut to the context, never refused for it
    short = encode_pairs(tokenizer, ["Where was Paris born?"], ["Tokyo"], context_limit=len(
        tokenizer("Where was Paris born?")["input_ids"]) + len(answers[0]) + 1, continuations=[[5, 6, 7]])
    assert short.follows.tolist().count(True) == 1
    plain = encode_pairs(tokenizer, ["Where was Paris born?"], ["Tokyo"])
    assert plain.follows is None and plain.answer_only().all()


def _drift_after_target(model, tokenizer, editor, edits, continuations) -> float:
    """Mean KL(unedited || edited) at the positions after the target, teacher-forced."""
    import torch

    batch = encode_pairs(tokenizer, [e.prompt for e in edits], [e.target for e in edits],
                         continuations=continuations)
    with editor.prompt_positions(batch.prompt_mask), torch.no_grad():
        edited = torch.log_softmax(answer_logits(model, batch)[batch.follows], -1)
    with editor.disabled(), torch.no_grad():
        unedited = torch.log_softmax(answer_logits(model, batch)[batch.follows], -1)
    return float(torch.nn.functional.kl_div(edited, unedited, log_target=True, reduction="batchmean"))


def test_an_expert_trained_on_the_continuation_drifts_less_after_the_target(tokenizer):
    edits = records(4)
    drift, reports = {}, {}
    for tokens in (0, 4):
        model = make_model("llama")
        continuations = greedy_completions(model, tokenizer, [f"{e.prompt} {e.target}" for e in edits], 4)
        editor = LifelongEditor(model, tokenizer, tiny_config(continuation_tokens=tokens, lora_rank=16, max_steps=60))
        reports[tokens] = editor.edit(edits)
        drift[tokens] = _drift_after_target(model, tokenizer, editor, edits, continuations)
    assert reports[4].train_accuracy == [1.0] * 4  # the edits still hold; accuracy counts the target's tokens
    assert drift[4] < 0.75 * drift[0], drift  # measured: 0.80 without, 0.42 with


def test_continuation_tokens_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="continuation_tokens"):
        LEMoEConfig(continuation_tokens=-1)
    assert LEMoEConfig.from_dict({}).continuation_tokens == 0  # adapters saved before it train as they did
