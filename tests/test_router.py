"""KVAnchorRouter on hand-made vectors: regions, top-k gates, ties, truncation."""

from __future__ import annotations

import torch

from lemoe import LEMoEConfig
from lemoe.router import KVAnchorRouter


def _router(**config) -> KVAnchorRouter:
    router = KVAnchorRouter(4, LEMoEConfig(**{"route_floor": -1.0, **config}))
    router.stats_fitted.fill_(True)  # identity standardisation: values are the normalised inputs
    return router


E = torch.eye(4)


def test_routes_to_the_expert_holding_the_nearest_anchor_and_defers_the_rest():
    router = _router(route_margin=0.1)
    fit0 = router.add_expert_key(E[[0]], negatives=E[[3]])
    router.add_expert_key(E[[1]], negatives=E[[3]])
    assert fit0.max_negative == 0.0 and abs(fit0.threshold - 0.1) < 1e-6 and fit0.negatives_rejected == 1.0
    route = router.route(torch.stack([E[0], E[1] + 0.1 * E[0], E[3], -E[0]]), top_k=1, deferral=True)
    assert route.top1() == [0, 1, None, None]
    assert route.gates[:2, 0].tolist() == [1.0, 1.0]


def test_without_deferral_every_input_goes_to_some_expert():
    router = _router(deferral=False)
    router.add_expert_key(E[[0]], negatives=E[[3]])
    assert router.route(E[[3]], top_k=1, deferral=False).top1() == [0]


def test_topk_gates_are_renormalised_over_accepted_experts():
    router = _router(route_margin=0.0)
    router.add_expert_key(E[[0]], negatives=-E[[0]])
    router.add_expert_key(E[[1]], negatives=-E[[1]])
    router.add_expert_key(E[[2]], negatives=E[[2]] + E[[3]])  # threshold cos 45deg
    both = (E[0] + E[1])[None]
    route = router.route(both, top_k=3, deferral=True)
    fired = route.experts[route.experts >= 0]
    assert sorted(fired.tolist()) == [0, 1]  # expert 2's region rejects it (score 0 < 0.707)
    assert torch.allclose(route.gates.sum(dim=1), torch.ones(1))
    assert torch.allclose(route.gates[0, :2], torch.tensor([0.5, 0.5]), atol=1e-4)


def test_the_newest_expert_wins_an_exact_tie():
    router = _router()
    router.add_expert_key(E[[0]], negatives=E[[3]])
    router.add_expert_key(E[[0]], negatives=E[[3]])  # the same prompt edited again
    assert router.route(E[[0]], top_k=1, deferral=True).top1() == [1]


def test_an_expert_with_several_anchors_scores_by_its_best_one():
    router = _router(route_margin=0.05)
    router.add_expert_key(E[[0, 1]], negatives=E[[3]])
    scores = router.expert_scores(router.value(E[[1]]))
    assert torch.allclose(scores, torch.ones(1, 1))
    assert router.route(E[[0, 1, 2]], top_k=1, deferral=True).top1() == [0, 0, None]


def test_truncate_removes_newer_experts_and_their_anchors():
    router = _router()
    for i in range(3):
        router.add_expert_key(E[[i]], negatives=E[[3]])
    router.truncate(1)
    assert router.num_experts == 1 and router.anchors.shape == (1, 4)
    assert router.anchor_experts.tolist() == [0]
    router.truncate(0)
    assert not bool(router.stats_fitted)


def test_pooling_ignores_padding_and_last_takes_the_last_prompt_token():
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    mean = _router(pooling="mean").pool(hidden, mask)
    assert torch.equal(mean[0], hidden[0, :2].mean(0)) and torch.equal(mean[1], hidden[1, 1:].mean(0))
    last = _router(pooling="last").pool(hidden, mask)
    assert torch.equal(last[0], hidden[0, 1]) and torch.equal(last[1], hidden[1, 2])


def test_the_floor_bounds_how_wide_a_region_can_be():
    router = _router(route_margin=0.05, route_floor=0.5)
    fit = router.add_expert_key(E[[0]], negatives=-E[[0]])  # the negative alone would allow cos > -0.95
    assert fit.threshold == 0.5
    tilted = torch.nn.functional.normalize(E[0] + 2 * E[1], dim=0)[None]  # cos 0.447 to the anchor
    assert router.route(tilted, top_k=1, deferral=True).top1() == [None]


def test_hidden_experts_never_fire():
    import torch

    from lemoe.router import hide_experts, top_k_route

    scores = torch.tensor([[0.9, 0.2, 0.95], [float("-inf"), float("-inf"), 0.5]])
    assert hide_experts(scores, None) is scores and hide_experts(scores, 3) is scores
    assert top_k_route(hide_experts(scores, 2), 1).top1() == [0, None]  # the best (index 2) is hidden
    assert top_k_route(hide_experts(scores, 0), 1).top1() == [None, None]
