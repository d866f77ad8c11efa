"""Behavioural checks run on every tiny architecture (Llama, Qwen2, GPT-2)."""

from __future__ import annotations

import torch

from conftest import key_buffers, logits_of, make_model, records, reject_everything, tiny_config
from lemoe import LifelongEditor
from lemoe.layer import LEMoELayer

PROBES = ["Where was Paris 0 born?", "the quick brown fox jumps over", "What is the language of the film?"]


def test_inserting_an_expert_changes_no_logits(arch, tokenizer):
    model = make_model(arch)
    before = logits_of(model, tokenizer, PROBES)
    editor = LifelongEditor(model, tokenizer, tiny_config())
    assert torch.equal(logits_of(model, tokenizer, PROBES), before)  # wrapping alone
    editor.adaptor.add_expert(editor.adaptor.new_expert())
    forced = torch.zeros(1, dtype=torch.long)
    with editor.adaptor.forced_route(forced):  # even when every input is sent to the new expert
        assert torch.equal(logits_of(model, tokenizer, PROBES), before)


def test_edit_changes_the_target_prediction(arch, tokenizer):
    model = make_model(arch)
    batch = records(3)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150))
    report = editor.edit(batch)
    assert report.expert == 0 and report.num_edits == 3
    assert min(report.train_accuracy) == 1.0
    assert all(report.routed_to_own)
    from lemoe.metrics import token_accuracy

    rel = token_accuracy(model, tokenizer, [r.prompt for r in batch], [r.target for r in batch], editor.adaptor)
    assert min(rel) == 1.0
    with editor.disabled():
        base_rel = token_accuracy(model, tokenizer, [r.prompt for r in batch], [r.target for r in batch], editor.adaptor)
    assert max(base_rel) < 1.0


def test_earlier_experts_stay_bit_identical_and_keep_their_routes(arch, tokenizer):
    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=3, min_steps=1))
    snapshots: list[dict[str, torch.Tensor]] = []
    all_records = []
    for batch_index in range(20):
        batch = records(2, offset=2 * batch_index)
        all_records.extend(batch)
        editor.edit(batch)
        snapshots.append({k: v.clone() for k, v in editor.adaptor.experts[batch_index].state_dict().items()})
        if batch_index == 0:
            keys_after_first = key_buffers(editor.adaptor.router)
    for index, snapshot in enumerate(snapshots):
        for name, tensor in editor.adaptor.experts[index].state_dict().items():
            assert torch.equal(tensor, snapshot[name]), f"expert {index} tensor {name} changed"
    for name, before in keys_after_first.items():  # keys only grow: the first batch's stay bit-identical
        assert torch.equal(key_buffers(editor.adaptor.router)[name][: len(before)], before), name
    routes = editor.route([r.prompt for r in all_records])
    assert routes == [i // 2 for i in range(40)]
    assert editor.routing_consistency() == 1.0


def test_unload_restores_the_model_bit_for_bit(arch, tokenizer):
    model = make_model(arch)
    before = logits_of(model, tokenizer, PROBES)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = LifelongEditor(model, tokenizer, tiny_config())
    original_ffn = editor.adaptor.base_layer
    editor.edit(records(3))
    assert not torch.equal(logits_of(model, tokenizer, [records(1)[0].prompt]),
                           logits_of(make_model(arch), tokenizer, [records(1)[0].prompt]))
    editor.unload()
    assert torch.equal(logits_of(model, tokenizer, PROBES), before)
    assert not any(isinstance(m, LEMoELayer) for m in model.modules())
    assert original_ffn in list(model.modules())
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)
    assert not model._forward_pre_hooks


def test_disabled_gives_base_logits(arch, tokenizer):
    model = make_model(arch)
    before = logits_of(model, tokenizer, PROBES)
    editor = LifelongEditor(model, tokenizer, tiny_config())
    editor.edit(records(2))
    with editor.disabled():
        assert torch.equal(logits_of(model, tokenizer, PROBES), before)


def test_deferred_inputs_get_exactly_the_base_output(arch, tokenizer):
    model = make_model(arch)
    unrelated = ["the quick brown fox jumps over the lazy dog"]
    before = logits_of(model, tokenizer, unrelated)
    editor = LifelongEditor(model, tokenizer, tiny_config())
    editor.edit(records(2))
    if editor.route(unrelated) == [None]:
        assert torch.equal(logits_of(model, tokenizer, unrelated), before)
    # force the question: an expert whose region rejects everything must leave every output alone
    reject_everything(editor.adaptor.router)
    assert editor.route([records(1)[0].prompt]) == [None]
    probes = [records(1)[0].prompt] + unrelated
    fresh = make_model(arch)
    assert torch.equal(logits_of(model, tokenizer, probes), logits_of(fresh, tokenizer, probes))


def test_generate_with_and_without_kv_cache_agree(arch, tokenizer):
    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150))
    batch = records(3)
    assert min(editor.edit(batch).train_accuracy) == 1.0
    for record in batch[:2]:
        ids = tokenizer(record.prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        cached = model.generate(**ids, use_cache=True, **kwargs)
        uncached = model.generate(**ids, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        target_ids = tokenizer(" " + record.target, add_special_tokens=False)["input_ids"]
        generated = cached[0, ids["input_ids"].shape[1]:].tolist()
        assert generated[: len(target_ids)] == target_ids


def test_batched_left_padded_generation_matches_single(arch, tokenizer):
    from lemoe.metrics import greedy_completions

    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=30))
    batch = records(3)
    editor.edit(batch)
    prompts = [r.prompt for r in batch] + ["the quick brown fox"]
    together = greedy_completions(model, tokenizer, prompts, 4, batch_size=4)
    alone = [greedy_completions(model, tokenizer, [p], 4)[0] for p in prompts]
    assert together == alone


def test_rollback_restores_the_earlier_state(arch, tokenizer):
    model = make_model(arch)
    editor = LifelongEditor(model, tokenizer, tiny_config())
    editor.edit(records(2))
    probes = [r.prompt for r in records(6)]
    after_one = logits_of(model, tokenizer, probes)
    editor.edit(records(2, offset=2))
    editor.edit(records(2, offset=4))
    assert not torch.equal(logits_of(model, tokenizer, probes), after_one)
    removed = editor.rollback(batches=2)
    assert removed == 4 and editor.num_experts == 1 and len(editor.edits) == 2
    assert torch.equal(logits_of(model, tokenizer, probes), after_one)
    editor.rollback(batches=1)
    fresh = make_model(arch)
    assert torch.equal(logits_of(model, tokenizer, probes), logits_of(fresh, tokenizer, probes))


def test_only_the_new_expert_gets_gradients_and_base_is_untouched(arch, tokenizer):
    model = make_model(arch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = LifelongEditor(model, tokenizer, tiny_config())
    editor.edit(records(2))
    editor.edit(records(2, offset=2))
    for name, tensor in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if plain in base_state and ".experts." not in name and ".router." not in name:
            assert torch.equal(tensor, base_state[plain]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in editor.adaptor.experts.parameters())


def test_ffn_expert_kind_edits_and_is_zero_at_creation(arch, tokenizer):
    model = make_model(arch)
    before = logits_of(model, tokenizer, PROBES)
    editor = LifelongEditor(model, tokenizer, tiny_config(expert="ffn", lr=1e-2, max_steps=150))
    editor.adaptor.add_expert(editor.adaptor.new_expert())
    with editor.adaptor.forced_route(torch.zeros(1, dtype=torch.long)):
        assert torch.equal(logits_of(model, tokenizer, PROBES), before)
    editor.adaptor.truncate(0)
    report = editor.edit(records(2))
    assert min(report.train_accuracy) == 1.0


def test_beam_search_with_and_without_kv_cache_agree(tokenizer):
    model = make_model("llama")
    editor = LifelongEditor(model, tokenizer, tiny_config(max_steps=150))
    batch = records(3)
    assert min(editor.edit(batch).train_accuracy) == 1.0
    ids = tokenizer(batch[0].prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**ids, use_cache=True, **kwargs), model.generate(**ids, use_cache=False, **kwargs))


def test_refit_statistics_moves_values_but_never_the_frozen_anchors(tokenizer):
    frozen = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=2, key="pooled"))
    refit = LifelongEditor(make_model("llama"), tokenizer, tiny_config(max_steps=2, value_statistics="refit",
                                                                       key="pooled"))
    for editor in (frozen, refit):
        editor.edit(records(3))
        centre, first_anchors = editor.adaptor.router.center.clone(), editor.adaptor.router.anchors.clone()
        editor.edit(records(3, offset=3))
        router = editor.adaptor.router
        assert torch.equal(router.anchors[:3], first_anchors)  # keys never move
        assert torch.equal(router.center, centre) == (editor is frozen)
    # with frozen statistics a stored prompt's value is exactly its anchor
    router = frozen.adaptor.router
    assert torch.equal(router.value(router.anchor_pooled), router.anchors)
    assert frozen.routing_consistency() == 1.0


def test_routing_from_a_lower_layer(tokenizer):
    """route_layer < layer: the value is pooled from the lower layer's FFN input, in every path
    (edit, route(), teacher-forced scoring, cached and uncached generation)."""
    from lemoe.metrics import token_accuracy

    model = make_model("llama")
    editor = LifelongEditor(model, tokenizer, tiny_config(layer=2, route_layer=1, subject_layer=0, max_steps=150))
    assert editor.route_layer_idx == 1 and editor.adaptor.tapped_layers == {0, 1}  # relation at 1, subject at 0
    seen: list[torch.Tensor] = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    pooled = editor.pooled_prompts([PROBES[0]])
    handle.remove()
    ids = tokenizer(PROBES[0])["input_ids"]
    content = [p for p, t in enumerate(ids) if p > 0 and t not in tokenizer.all_special_ids]  # pooling 'content'
    assert torch.allclose(pooled[0], seen[-1][0][content].mean(dim=0), atol=1e-6)
    assert editor.pooled_prompts([]).shape == (0, 64) and editor.route([]) == []

    first, second = records(2), records(2, offset=2)
    editor.edit(first)
    editor.edit(second)
    prompts = [r.prompt for r in first + second]
    assert editor.route(prompts) == [0, 0, 1, 1]
    rel = token_accuracy(model, tokenizer, prompts, [r.target for r in first + second], editor.adaptor)
    assert min(rel) == 1.0
    for record in first[:1] + second[:1]:
        ids = tokenizer(record.prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(model.generate(**ids, use_cache=True, **kwargs),
                           model.generate(**ids, use_cache=False, **kwargs))
    editor.unload()
    assert not model.model.layers[0].mlp._forward_pre_hooks  # the taps are gone with the adaptor
    assert not model.model.layers[1].mlp._forward_pre_hooks and not model.model.embed_tokens._forward_pre_hooks


def test_route_layer_above_the_adaptor_layer_is_refused(tokenizer):
    import pytest

    from lemoe import LEMoEConfig

    with pytest.raises(ValueError, match="route_layer \\(3\\) must not be above layer \\(1\\)"):
        LEMoEConfig(layer=1, route_layer=3)
    with pytest.raises(ValueError, match="must not be above layer"):
        LifelongEditor(make_model("qwen2"), tokenizer, LEMoEConfig(route_layer=3))  # default layer: 2 of 3
