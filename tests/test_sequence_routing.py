"""Routing once per sequence, on every path a model is called by (lemoe.sequence_routing).

Each test records the expert every forward call of the adaptor used and checks it against the
route of the prompt as `LifelongEditor.route` decides it, so a decode step that re-routes on its
one new token (what happened when transformers 5.24 renamed `past_key_values` to `cache`) fails.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from conftest import make_model, records, tiny_config
from lemoe import LifelongEditor
from lemoe.sequence_routing import decision_rows, expand_to, find_cache, generate_prompt, select_rows
from lemoe.router import Route

UNRELATED = "the quick brown fox jumps over"


def _cache_keywords() -> list[str]:
    """The cache keywords the installed transformers accepts: `past_key_values` (always, deprecated from
    5.24 on) and `cache` (5.24 and later)."""
    from transformers import LlamaForCausalLM

    names = ["past_key_values"]
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters:
        names.append("cache")
    return names


def edited(arch: str = "llama", tokenizer: Any = None) -> tuple[Any, LifelongEditor]:
    """A tiny model with two experts; each batch's prompts route to their own expert."""
    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=60))
    editor.edit(records(2))
    editor.edit(records(2, offset=2))
    return model, editor


def record_routes(editor: LifelongEditor) -> list[list[int]]:
    """Every forward call's top-1 expert per row (-1: none fires), appended as the model runs."""
    seen: list[list[int]] = []
    original = editor.adaptor._route_for

    def spy(x: torch.Tensor) -> Route:
        route = original(x)
        seen.append(route.experts[:, 0].tolist())
        return route

    editor.adaptor._route_for = spy  # type: ignore[method-assign]
    return seen


def record_reuse(editor: LifelongEditor) -> list[bool]:
    """Per forward call of the adaptor: whether it reused a decision taken earlier in the sequence."""
    reused: list[bool] = []
    routing = editor.sequence_routing
    original = routing.reusable

    def spy(batch: int) -> Any:
        reuse = original(batch)
        reused.append(reuse is not None)
        return reuse

    routing.reusable = spy  # type: ignore[method-assign]
    return reused


def expected(editor: LifelongEditor, prompts: list[str]) -> list[int]:
    return [-1 if e is None else e for e in editor.route(prompts)]


def lone_token(tokenizer: Any) -> torch.Tensor:
    """(1, 1) a decode step's token that, routed on its own, goes to no expert."""
    return torch.tensor([tokenizer("?", add_special_tokens=False)["input_ids"][:1]])


def greedy_kwargs(tokenizer: Any, steps: int = 5) -> dict[str, Any]:
    return dict(max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)


def test_the_probes_are_routed_apart(tokenizer):
    """The premise of every test below: edited prompts go to their own expert, a one-token
    prompt and an unrelated one go nowhere, so re-routing on a decode step is visible."""
    model, editor = edited("llama", tokenizer)
    prompts = [records(1)[0].prompt, records(1, offset=2)[0].prompt, UNRELATED, "?"]
    assert expected(editor, prompts) == [0, 1, -1, -1]


STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "greedy_uncached": {"use_cache": False},
    "sampling": {"do_sample": True, "top_k": 5},
    "beam_search": {"num_beams": 3, "num_return_sequences": 2},
    "chunked_prefill": {"prefill_chunk_size": 3},
    "prompt_lookup": {"prompt_lookup_num_tokens": 2},
}


def strategy_kwargs(strategy: str) -> dict[str, Any]:
    """The strategy's `generate` arguments; chunked prefill gets its cache up front, which transformers
    5.0 needs (it refuses to chunk without one) and later releases accept."""
    kwargs = dict(STRATEGIES[strategy])
    if strategy == "chunked_prefill":
        from transformers import DynamicCache

        kwargs[_cache_keywords()[-1]] = DynamicCache()
    return kwargs


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_generate_strategy_keeps_the_prompt_route(strategy, tokenizer):
    model, editor = edited("llama", tokenizer)
    prompt = records(1, offset=2)[0].prompt
    ids = tokenizer(prompt, return_tensors="pt")
    greedy = greedy_kwargs(tokenizer)
    if strategy == "prompt_lookup":  # transformers 5.0's prompt lookup needs an end-of-sequence token
        greedy["eos_token_id"] = tokenizer.eos_token_id
    reference = model.generate(**ids, **greedy)
    seen = record_routes(editor)
    torch.manual_seed(0)
    output = model.generate(**ids, **{**greedy, **strategy_kwargs(strategy)})
    assert len(seen) >= 3  # a prefill and decode steps (more with chunks or uncached calls)
    assert all(set(rows) == {1} for rows in seen), seen
    if strategy in ("greedy_uncached", "chunked_prefill", "prompt_lookup"):
        assert torch.equal(output, reference)  # the same tokens as cached greedy decoding


def test_assisted_decoding_with_an_assistant_model(tokenizer):
    model, editor = edited("llama", tokenizer)
    prompt = records(1)[0].prompt
    ids = tokenizer(prompt, return_tensors="pt")
    reference = model.generate(**ids, **greedy_kwargs(tokenizer))
    seen = record_routes(editor)
    assistant = make_model("llama", seed=3)
    assisted = model.generate(**ids, assistant_model=assistant, **greedy_kwargs(tokenizer))
    assert torch.equal(assisted, reference)
    assert seen and all(set(rows) == {0} for rows in seen)


@pytest.mark.parametrize("keyword", _cache_keywords())
def test_a_cache_held_by_the_caller(keyword, tokenizer):
    """A hand-written greedy loop: the decision rides on the cache object, whatever its keyword."""
    from transformers import DynamicCache

    model, editor = edited("llama", tokenizer)
    prompt = records(1, offset=2)[0].prompt
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    reference = model.generate(input_ids=ids, **greedy_kwargs(tokenizer))
    seen = record_routes(editor)
    cache, tokens = DynamicCache(), ids
    with torch.no_grad():
        step_input = ids
        for _ in range(5):
            out = model(input_ids=step_input, use_cache=True, **{keyword: cache})
            step_input = out.logits[:, -1:].argmax(dim=-1)
            tokens = torch.cat([tokens, step_input], dim=1)
    assert torch.equal(tokens, reference)
    assert seen == [[1]] * 5


def test_a_cache_the_model_creates_carries_the_decision(tokenizer):
    """No cache passed in: the model makes one, and the decision is found on it in the output."""
    model, editor = edited("llama", tokenizer)
    ids = tokenizer(records(1)[0].prompt, return_tensors="pt")["input_ids"]
    seen, reused = record_routes(editor), record_reuse(editor)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = find_cache(out.values())
        assert cache is not None
        model(input_ids=lone_token(tokenizer), **{_cache_keywords()[-1]: cache}, use_cache=True)
    assert seen == [[0], [0]] and reused == [False, True]


def test_a_reset_cache_decides_afresh(tokenizer):
    from transformers import DynamicCache

    model, editor = edited("llama", tokenizer)
    first = tokenizer(records(1)[0].prompt, return_tensors="pt")["input_ids"]
    second = tokenizer(UNRELATED, return_tensors="pt")["input_ids"]
    keyword = _cache_keywords()[-1]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=first, use_cache=True, **{keyword: cache})
        cache.reset()  # empties the cache from transformers 5.x on; 5.0 only zeroes it, and crop(0) empties it
        if cache.get_seq_length():
            cache.crop(0)
        assert cache.get_seq_length() == 0
        reused = model(input_ids=second, use_cache=True, **{keyword: cache}).logits
        fresh = model(input_ids=second).logits
    assert torch.equal(reused, fresh)


def test_left_padded_batch_of_different_prompts(tokenizer):
    from lemoe.metrics import greedy_completions

    model, editor = edited("gpt2", tokenizer)  # absolute positions: left padding must not move them
    prompts = [records(1)[0].prompt, records(1, offset=2)[0].prompt, UNRELATED]
    want = expected(editor, prompts)
    assert want == [0, 1, -1]
    seen = record_routes(editor)
    together = greedy_completions(model, tokenizer, prompts, 4, batch_size=3)
    assert seen and all(rows == want for rows in seen), seen
    alone = [greedy_completions(model, tokenizer, [p], 4)[0] for p in prompts]
    assert together == alone


def test_direct_forward_routes_on_everything_it_is_given(tokenizer):
    """lm-eval-harness style: context + continuation in one call, no mask, no cache. Decided on the
    whole sequence, whatever calls came before (no decision leaks from an earlier sequence)."""
    model, editor = edited("llama", tokenizer)
    text = records(1, offset=2)[0].prompt + " Japan"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = model(ids).logits
        with editor.prompt_positions(torch.ones_like(ids)):
            explicit = model(ids).logits
        other = tokenizer(records(1)[0].prompt, return_tensors="pt")
        model.generate(**other, **greedy_kwargs(tokenizer))  # another sequence, same batch size
        model(other["input_ids"], use_cache=True)
        again = model(ids).logits
    assert torch.equal(first, explicit)
    assert torch.equal(first, again)


def test_generate_from_inputs_embeds_decides_at_prefill(tokenizer):
    """No token ids at `generate` entry: the prefill call decides and the cache carries it."""
    model, editor = edited("llama", tokenizer)
    ids = tokenizer(records(1)[0].prompt, return_tensors="pt")
    embeds = model.get_input_embeddings()(ids["input_ids"])
    seen = record_routes(editor)
    model.generate(inputs_embeds=embeds, attention_mask=ids["attention_mask"], **greedy_kwargs(tokenizer))
    assert len(seen) >= 2 and all(rows == [0] for rows in seen), seen


def test_a_renamed_cache_keyword_still_continues_the_sequence(tokenizer):
    """A future release may rename the cache keyword again: a model whose forward takes it as
    `kv_state` keeps the prompt's decision on decode steps, because the cache is found by type."""
    from transformers import DynamicCache, LlamaForCausalLM

    class RenamedCacheModel(LlamaForCausalLM):
        def forward(self, input_ids: Any = None, kv_state: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
            return super().forward(input_ids=input_ids, **{_cache_keywords()[-1]: kv_state}, **kwargs)

    plain = make_model("llama")
    model = RenamedCacheModel(plain.config)
    model.load_state_dict(plain.state_dict())
    model.eval()
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=60))
    editor.edit(records(2))
    seen, reused = record_routes(editor), record_reuse(editor)
    ids = tokenizer(records(1)[0].prompt, return_tensors="pt")["input_ids"]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, kv_state=cache, use_cache=True)
        model(input_ids=lone_token(tokenizer), kv_state=cache, use_cache=True)
    assert seen == [[0], [0]] and reused == [False, True]


def test_rollback_while_a_sequence_holds_a_decision(tokenizer):
    """A cache decided on an expert that is rolled back afterwards: that expert no longer fires."""
    from transformers import DynamicCache

    model, editor = edited("llama", tokenizer)
    ids = tokenizer(records(1, offset=2)[0].prompt, return_tensors="pt")["input_ids"]
    keyword = _cache_keywords()[-1]
    cache = DynamicCache()
    seen = record_routes(editor)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{keyword: cache})
        editor.rollback(1)
        model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{keyword: cache})
    assert seen == [[1], [-1]]


def test_unload_removes_the_generate_wrapper_and_hooks(tokenizer):
    model = make_model("llama")
    editor = LifelongEditor(model, tokenizer, tiny_config())
    assert "generate" in model.__dict__
    editor.unload()
    assert "generate" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    # a second editor after the first wraps and unwraps cleanly too
    again = LifelongEditor(model, tokenizer, tiny_config())
    again.edit(records(1))
    ids = tokenizer(records(1)[0].prompt, return_tensors="pt")
    model.generate(**ids, **greedy_kwargs(tokenizer, 2))
    again.unload()
    assert "generate" not in model.__dict__


def test_rows_of_a_decision_are_selected_and_expanded():
    route = Route(torch.tensor([[0], [1], [-1]]), torch.ones(3, 1))
    assert decision_rows(route) == 3 and decision_rows("train") is None
    picked = select_rows(route, torch.tensor([2, 0]))
    assert picked.experts.tolist() == [[-1], [0]]
    expanded = expand_to(route, 3, 6)
    assert expanded is not None and expanded.experts[:, 0].tolist() == [0, 0, 1, 1, -1, -1]
    assert expand_to(route, 3, 4) is None
    assert expand_to((torch.tensor([True, False]),), 2, 4)[0].tolist() == [True, True, False, False]


def test_the_prompt_of_a_generate_call(tokenizer):
    model = make_model("llama")
    signature = inspect.signature(model.generate)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert generate_prompt(model, signature, (ids,), {"attention_mask": mask})[1] is mask
    _, inferred = generate_prompt(model, signature, (), {"input_ids": ids, "pad_token_id": 0, "eos_token_id": 1})
    assert torch.equal(inferred, mask)
    _, no_pad = generate_prompt(model, signature, (), {"input_ids": ids, "pad_token_id": 0, "eos_token_id": 0})
    assert torch.equal(no_pad, torch.ones_like(ids))  # pad == eos: generate cannot tell padding apart
    assert generate_prompt(model, signature, (), {"inputs_embeds": torch.zeros(1, 2, 64)}) == (None, None)
