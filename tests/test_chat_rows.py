"""`chat_rows`: each edit is also trained as the answer to its prompt sent as a chat user turn (the reply as
the template writes it: no leading space, the end of turn after it); keys still come from the plain prompts only."""

from __future__ import annotations

import copy

import torch

from conftest import expert_says, make_model, records, tiny_config, tiny_tokenizer
from lemoe import LifelongEditor
from lemoe.editor import encode_edits
from lemoe.encoding import chat_prompt_ids, chat_reply_ids, encode_answer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
# a template that ends each turn (as SmolLM2's <|im_end|> does), with a newline after it
ENDED_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chat_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_the_batch_gets_one_chat_row_per_edit_only_with_a_template():
    tok, model, recs = _chat_tokenizer(), make_model("llama"), records(3)
    plain = encode_edits(tok, model, recs, 0)
    chat = encode_edits(tok, model, recs, 0, chat=True)
    assert plain.size == 3 and chat.size == 6
    assert tok.decode(chat_prompt_ids(tok, recs[0].prompt)) == f"<user>{recs[0].prompt}<assistant>"
    assert encode_edits(tiny_tokenizer(), model, recs, 0, chat=True).size == 3  # no template: plain rows only


def answer_tokens(batch, row: int) -> list[int]:
    return batch.targets[batch.rows == row].tolist()


def test_a_chat_row_is_answered_as_the_template_writes_a_reply_and_ends_the_turn():
    tok, model, recs = _chat_tokenizer(), make_model("llama"), records(2)
    tok.chat_template = ENDED_TEMPLATE
    batch = encode_edits(tok, model, recs, 0, chat=True)
    for k, record in enumerate(recs):
        assert answer_tokens(batch, k) == encode_answer(tok, record.target)  # plain row: " target"
        chat_row = answer_tokens(batch, len(recs) + k)
        assert tok.decode(chat_row) == f"{record.target.strip()}<eos>"  # no leading space; the newline after: dropped
        prompt, reply = chat_reply_ids(tok, record.prompt, record.target)
        assert prompt == chat_prompt_ids(tok, record.prompt) and reply == chat_row
        row = batch.input_ids[len(recs) + k, : len(prompt)].tolist()
        assert row == prompt  # the row is the chat prompt a client sends, then the reply


def test_a_template_that_rewrites_the_conversation_falls_back_to_the_target_after_the_prompt():
    tok, model, recs = _chat_tokenizer(), make_model("llama"), records(1)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")  # replies written otherwise
    assert chat_reply_ids(tok, recs[0].prompt, recs[0].target) is None
    refusing = _chat_tokenizer()
    refusing.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no') }}"
                              "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_reply_ids(refusing, recs[0].prompt, recs[0].target) is None  # a template that refuses replies
    batch = encode_edits(tok, model, recs, 0, chat=True)
    assert answer_tokens(batch, 1) == encode_answer(tok, recs[0].target)
    assert batch.input_ids[1, : batch.attention_mask[1].sum() - len(answer_tokens(batch, 1))].tolist() == \
        chat_prompt_ids(tok, recs[0].prompt)


def test_chat_rows_teach_the_chat_answer_and_its_end_of_turn_and_key_on_the_plain_prompts():
    tok = _chat_tokenizer()
    tok.chat_template = ENDED_TEMPLATE
    recs = records(2)
    results = {}
    for chat_rows in (False, True):
        model = make_model("llama")
        editor = LifelongEditor(model, tok, tiny_config(max_steps=150, chat_rows=chat_rows))
        report = editor.edit(recs)
        assert editor.adaptor.router.num_edits == 2 and len(report.routed_to_own) == 2
        results[chat_rows] = sum(expert_says(editor, tok, *chat_reply_ids(tok, r.prompt, r.target)) for r in recs)
    assert results[True] == 2 and results[True] > results[False]


def test_length_groups_split_only_when_padding_would_waste_enough():
    from lemoe.encoding import length_groups

    assert length_groups([5, 6, 5, 7]) == [[0, 1, 2, 3]]  # similar lengths: one part
    assert length_groups([5, 30, 6, 31, 5, 29]) == [[0, 2, 4], [1, 3, 5]]  # plain and chat rows: two parts
    assert length_groups([9]) == [[0]]


def test_a_batch_run_in_two_parts_trains_the_same_expert_as_one_padded_batch():
    """Plain rows and long chat rows are run as two parts (no padding to the chat width); right padding
    and a causal model make that exact: same steps, loss, accuracy and weights as the padded batch."""
    from lemoe.encoding import length_groups
    from lemoe.training import OptimiseSettings, capture_layer_inputs, optimise

    tok, recs = _chat_tokenizer(), records(3)
    tok.chat_template = "<system>You are a helpful assistant; answer in a few words, truthfully.</system>" + CHAT_TEMPLATE
    results = []
    for split in (False, True):
        model = make_model("llama")
        editor = LifelongEditor(model, tok, tiny_config())
        batch = encode_edits(tok, model, recs, 0, continuations=[[5, 6], [7], [8, 9, 10]], chat=True)
        assert len(length_groups(batch.attention_mask.sum(dim=1).tolist())) == 2  # the split applies
        layer_input, _ = capture_layer_inputs(model, editor.layers, editor.layer_idx, editor.adaptor, {}, batch)
        expert_id = editor.adaptor.add_expert(editor.adaptor.new_expert())
        params = list(editor.adaptor.experts[expert_id].parameters())
        settings = OptimiseSettings(lr=5e-2, max_steps=6, early_stop=False, split_by_length=split)
        result = optimise(model, editor.layers, editor.layer_idx, batch, layer_input, params, settings,
                          editor.adaptor.forced_route(torch.tensor([expert_id])))
        results.append((result, [p.detach().clone() for p in params]))
    (whole, whole_params), (parts, part_params) = results
    assert whole.steps == parts.steps == 6
    assert abs(whole.final_loss - parts.final_loss) < 1e-4
    assert whole.token_accuracy == parts.token_accuracy
    for a, b in zip(whole_params, part_params):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_chat_clean_counts_a_chat_answer_that_ends_its_turn_after_the_target():
    """`chat_clean` (probe_metrics): with chat rows the reply is the target and the end of turn; without them
    the chat answer, if it holds the target at all, runs on."""
    from lemoe import EditRecord
    from lemoe.probe_metrics import ProbeEvaluator

    tok = _chat_tokenizer()
    tok.chat_template = ENDED_TEMPLATE
    recs = [EditRecord(prompt=r.prompt, target=r.target, subject=r.subject) for r in records(2)]  # chat asks the prompt
    clean = {}
    for chat_rows in (False, True):
        model = make_model("llama")
        evaluator = ProbeEvaluator(model, tok, recs)
        editor = LifelongEditor(model, tok, tiny_config(max_steps=150, chat_rows=chat_rows))
        editor.edit(recs)
        with editor.adaptor.forced_route(torch.tensor([0])):  # the expert itself (the tiny model's routing: elsewhere)
            scores = evaluator.evaluate(range(len(recs)))
        assert all(not c or g for c, g in zip(scores["chat_clean"], scores["chat_gen"]))  # clean implies contains
        clean[chat_rows] = scores["chat_clean"]
    assert clean[True] == [1.0, 1.0] and clean[False] == [0.0, 0.0]
