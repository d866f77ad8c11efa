"""`prefix_rows`: each edit is also trained after short unrelated sentences (a built-in bank), so that it holds
where its question follows other text; keys still come from the plain prompts only."""

from __future__ import annotations

import pytest

from conftest import expert_says, make_model, records, save_as_older, tiny_config
from lemoe import LEMoEConfig, LifelongEditor
from lemoe.editor import context_prefixes, encode_edits, prefixes_for
from lemoe.encoding import encode_answer


def test_the_bank_is_rotated_over_edit_numbers_so_a_resumed_stream_gets_the_same_sentences():
    bank = context_prefixes()
    assert len(bank) >= 10 and len(set(bank)) == len(bank) and all(not s.startswith("#") for s in bank)
    whole = prefixes_for(0, 7, 2)
    assert prefixes_for(3, 4, 2) == whole[3:]  # edits 3..6 on their own: the same sentences
    assert all(len(set(sentences)) == 2 for sentences in whole)  # two different sentences per edit
    assert whole[0] != whole[1]


def test_prefixed_rows_follow_the_plain_rows_and_are_answered_with_the_target(tokenizer):
    model, recs = make_model("llama"), records(3)
    sentences = prefixes_for(0, 3, 2)
    batch = encode_edits(tokenizer, model, recs, 0, prefixes=sentences)
    assert batch.size == 3 + 3 * 2
    for k, record in enumerate(recs):
        target = encode_answer(tokenizer, record.target)
        assert batch.targets[batch.rows == k].tolist() == target
        for j, sentence in enumerate(sentences[k]):
            row = 3 + 2 * k + j
            assert batch.targets[batch.rows == row].tolist() == target
            length = int(batch.attention_mask[row].sum())
            prompt = tokenizer.decode(batch.input_ids[row, : length - len(target)])
            assert prompt == f"{sentence} {record.prompt}"


def test_continuations_stay_on_the_plain_rows(tokenizer):
    model, recs = make_model("llama"), records(2)
    batch = encode_edits(tokenizer, model, recs, 0, continuations=[[5, 6], [7]], prefixes=prefixes_for(0, 2, 1))
    assert batch.size == 4
    assert batch.follows[batch.rows >= 2].sum() == 0  # prefixed rows: the answer only
    assert int(batch.follows.sum()) == 3


def test_an_edit_with_prefix_rows_keys_on_the_plain_prompts_and_answers_after_a_sentence(tokenizer):
    recs = records(2)
    hits = {}
    for rows in (0, 2):
        model = make_model("llama")
        editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150, prefix_rows=rows))
        report = editor.edit(recs)
        assert editor.adaptor.router.num_edits == 2 and len(report.routed_to_own) == 2  # keys: plain prompts
        sentence = prefixes_for(0, 2, 2)[0][0]  # a sentence edit 0 trained after (when rows > 0)
        hits[rows] = sum(expert_says(editor, tokenizer, tokenizer(f"{sentence} {r.prompt}")["input_ids"],
                                     encode_answer(tokenizer, r.target)) for r in recs)
    assert hits[2] >= 1 and hits[2] >= hits[0]


def test_prefix_rows_must_be_a_count():
    from lemoe.config import MAX_PREFIX_ROWS

    assert len(context_prefixes()) >= MAX_PREFIX_ROWS  # every allowed count gets different sentences per edit
    assert all(len(set(s)) == MAX_PREFIX_ROWS for s in prefixes_for(0, 3, MAX_PREFIX_ROWS))
    for bad in (-1, True, 1.5, "2", MAX_PREFIX_ROWS + 1):
        with pytest.raises(ValueError, match="prefix_rows"):
            LEMoEConfig(prefix_rows=bad)
    assert LEMoEConfig().prefix_rows == 0


def test_an_adapter_saved_without_prefix_rows_resumes_without_them(tokenizer, tmp_path):
    """Guards a later change of the default: an adapter saved before prefix rows existed keeps training without."""
    editor = LifelongEditor(make_model("llama"), tokenizer, tiny_config())
    editor.edit(records(2))
    save_as_older(editor, tmp_path, "0.8.0", "prefix_rows")
    resumed = LifelongEditor.open(make_model("llama"), tokenizer, tmp_path)
    assert resumed.config.prefix_rows == 0
    resumed.edit(records(2, offset=2))
    assert resumed.num_experts == 2
