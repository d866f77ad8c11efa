"""Content masks (lemoe.content): routing pools over the user's words, not over a chat template's
tokens, special tokens or the attention-sink first token."""

from __future__ import annotations

from typing import Any

import torch

from conftest import make_model, records, tiny_config, tiny_tokenizer
from lemoe import LEMoEConfig, LifelongEditor
from lemoe.content import ContentTokens, chat_markers
from lemoe.encoding import prompt_inputs
from lemoe.training import capture_route_inputs

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer() -> Any:
    import copy

    tok = copy.deepcopy(tiny_tokenizer())  # the shared one is cached: never change it
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def kept(tok: Any, ids: list[int], mask: torch.Tensor | None = None) -> str:
    content = ContentTokens(tok)
    row = torch.tensor([ids])
    chosen = content.mask(row, torch.ones_like(row) if mask is None else mask)[0]
    return tok.decode([t for t, k in zip(ids, chosen.tolist()) if k])


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_the_user_turn_header_and_end_are_learned_from_the_template():
    tok = chat_tokenizer()
    header, end = chat_markers(tok)
    assert tok.decode(header) == "<|im_start|>user\n" and tok.decode([end]) == "<|im_end|>"
    assert chat_markers(tiny_tokenizer()) == (None, None)  # no template: plain text only


def test_a_chat_keeps_only_its_last_user_message():
    tok = chat_tokenizer()
    ids = chat_ids(tok, [{"role": "system", "content": "the fox is quick"},
                         {"role": "user", "content": "Where was Paris born?"},
                         {"role": "assistant", "content": "Tokyo"},
                         {"role": "user", "content": "Who wrote the novel?"}])
    assert kept(tok, ids) == "Who wrote the novel?"


def test_plain_text_loses_its_first_token_and_special_tokens_only():
    tok = chat_tokenizer()
    ids = tok("Where was Paris born?")["input_ids"]
    assert kept(tok, ids) == tok.decode(ids[1:])
    eos = tok.eos_token_id
    assert kept(tok, [*ids, eos]) == tok.decode(ids[1:])
    # left padding: the first *real* token is the sink, not position 0
    pad = tok.pad_token_id
    mask = torch.tensor([[0, 0] + [1] * len(ids)])
    assert kept(tok, [pad, pad, *ids], mask) == tok.decode(ids[1:])


def test_a_row_with_nothing_left_keeps_its_mask():
    tok = chat_tokenizer()
    one = tok("Paris")["input_ids"][:1]
    assert kept(tok, one) == tok.decode(one)


def test_content_pooling_routes_a_chat_question_like_its_plain_prompt():
    """With pooling 'content' the pooled vector of a chat-wrapped prompt is pooled over the same words as
    the plain prompt; with 'mean' the template's tokens are pooled in too."""
    tok = chat_tokenizer()
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    prompt = records(1)[0].prompt
    chat = chat_ids(tok, [{"role": "system", "content": "the fox is quick"}, {"role": "user", "content": prompt}])
    distance = {}
    for pooling in ("content", "mean"):
        editor = LifelongEditor(model, tok, tiny_config(pooling=pooling, key="pooled", layer=0, route_layer=0))
        try:
            plain = editor.pooled_prompts([prompt])[0]
            ids = torch.tensor([chat])
            inputs = prompt_inputs(ids, torch.ones_like(ids))
            states = capture_route_inputs(model, editor.route_ffn, inputs)
            pooled = editor.adaptor.router.pool(states, editor.adaptor.routing_mask(inputs.attention_mask, ids))[0]
            distance[pooling] = float(torch.nn.functional.cosine_similarity(plain, pooled, dim=0))
        finally:
            editor.unload()
    assert distance["content"] > distance["mean"], distance


def test_adapters_made_with_mean_pooling_keep_it(tmp_path):
    assert LEMoEConfig().pooling == "content"
    assert LEMoEConfig.from_dict({"pooling": "mean"}).pooling == "mean"
