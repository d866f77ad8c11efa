"""lemoe.shared_prefix: rows that begin alike (chat rows: the template's system prompt) run that beginning once
while an expert trains. Paths: shared and exact (llama, qwen2, gpt2), too short, no cache keyword, a first run
that fails or gives other logits, a second run that gives other gradients. Sliding-window and softcapped models
(Gemma 3) are covered by the runtime check only: Gemma's template has no system prompt to share."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from conftest import make_model, records, tiny_config, tiny_tokenizer
from lemoe import LifelongEditor
from lemoe import shared_prefix
from lemoe.editor import encode_edits
from lemoe.encoding import encode_id_pairs
from lemoe.training import OptimiseSettings, capture_layer_inputs, optimise

SYSTEM_TEMPLATE = ("<system>You are a helpful assistant; answer in a few words, truthfully, and stop.</system>"
                   "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                   "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chat_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = SYSTEM_TEMPLATE
    return tok


def test_the_shared_length_stops_before_the_first_answer_and_needs_two_rows():
    pairs = [([1, 2, 3, 4, 5, 6], [7, 8]), ([1, 2, 3, 4, 9], [7]), ([1, 2, 3, 4, 5, 6, 7, 8], [9])]
    assert shared_prefix.shared_prefix_length(encode_id_pairs(pairs, pad=0)) == 4
    early = [([1, 2], [3, 4, 5]), ([1, 2], [3, 4, 6])]  # the first answer token is predicted at position 1
    assert shared_prefix.shared_prefix_length(encode_id_pairs(early, pad=0)) == 1
    assert shared_prefix.shared_prefix_length(encode_id_pairs(pairs[:1], pad=0)) == 0
    assert shared_prefix.shared_prefix_length(encode_id_pairs([([5, 6], [7]), ([6, 6], [7])], pad=0)) == 0


def test_the_cache_keyword_is_read_from_the_forward_signature(arch):
    model = make_model(arch)
    assert shared_prefix.cache_keyword(model) in ("cache", "past_key_values")

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    holder = torch.nn.Module()
    holder.base_model = NoCache()
    assert shared_prefix.cache_keyword(holder) is None


def _train(arch: str, share: bool, steps: int = 5):
    tok = _chat_tokenizer()
    model = make_model(arch)
    editor = LifelongEditor(model, tok, tiny_config())
    batch = encode_edits(tok, model, records(4), 0, chat=True)
    layer_input, _ = capture_layer_inputs(model, editor.layers, editor.layer_idx, editor.adaptor, {}, batch)
    expert_id = editor.adaptor.add_expert(editor.adaptor.new_expert())
    params = list(editor.adaptor.experts[expert_id].parameters())
    settings = OptimiseSettings(lr=5e-2, max_steps=steps, early_stop=False, split_by_length=True, share_prefix=share)
    result = optimise(model, editor.layers, editor.layer_idx, batch, layer_input, params, settings,
                      editor.adaptor.forced_route(torch.tensor([expert_id])))
    return model, result, [p.detach().clone() for p in params]


def test_sharing_the_beginning_trains_the_same_expert_as_running_every_token(arch):
    model, shared, shared_params = _train(arch, share=True)
    assert shared_prefix._VERIFIED.get(model) is True  # the shared path ran, and its first check passed
    _, full, full_params = _train(arch, share=False)
    assert shared.steps == full.steps == 5
    assert abs(shared.final_loss - full.final_loss) < 1e-4
    assert shared.token_accuracy == full.token_accuracy
    for a, b in zip(shared_params, full_params):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_sharing_is_not_used_below_the_minimum_or_without_a_cache_keyword(monkeypatch):
    calls = []
    original = shared_prefix._shared_logits
    monkeypatch.setattr(shared_prefix, "_shared_logits", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(shared_prefix, "MIN_SHARED_TOKENS", 10_000)
    model, _, _ = _train("llama", share=True, steps=2)
    assert not calls and model not in shared_prefix._VERIFIED
    monkeypatch.setattr(shared_prefix, "MIN_SHARED_TOKENS", 8)
    monkeypatch.setattr(shared_prefix, "cache_keyword", lambda model: None)
    model, _, _ = _train("llama", share=True, steps=2)
    assert not calls and model not in shared_prefix._VERIFIED


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_a_first_run_that_differs_or_fails_switches_sharing_off_for_that_model(failure, monkeypatch, caplog):
    original = shared_prefix._shared_logits

    def broken(*args):
        if failure == "raises":
            raise TypeError("forward() got an unexpected keyword argument")
        return original(*args) + 1.0  # what a release that mishandles the cache would give

    monkeypatch.setattr(shared_prefix, "_shared_logits", broken)
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        model, result, params = _train("llama", share=True)
    assert shared_prefix._VERIFIED.get(model) is False
    assert "training runs every token from now on" in caplog.text
    _, full, full_params = _train("llama", share=False)
    assert abs(result.final_loss - full.final_loss) < 1e-4  # the whole optimisation ran unshared
    for a, b in zip(params, full_params):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_a_second_run_whose_gradients_differ_switches_sharing_off(monkeypatch, caplog):
    original = shared_prefix._shared_logits

    def half_gradient(*args):  # the right logits, half the gradient: what a cache that detached part would give
        logits = original(*args)
        return logits.detach() + 0.5 * (logits - logits.detach())

    monkeypatch.setattr(shared_prefix, "_shared_logits", half_gradient)
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        model, _, _ = _train("llama", share=True, steps=3)
    assert shared_prefix._VERIFIED.get(model) is False
    assert "gradients differ" in caplog.text


def test_an_edit_with_chat_rows_learns_the_chat_answer_with_sharing_on():
    tok = _chat_tokenizer()
    model = make_model("llama")
    editor = LifelongEditor(model, tok, tiny_config(max_steps=150, chat_rows=True))
    report = editor.edit(records(2))
    assert shared_prefix._VERIFIED.get(model) is True
    assert min(report.train_accuracy) == 1.0  # every row, chat rows included, answered when training stopped
