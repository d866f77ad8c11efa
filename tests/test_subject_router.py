"""SubjectRelationRouter on hand-made vectors: an edit fires only where both its subject and its
relation match; frozen keys, ties, truncation, consistency."""

from __future__ import annotations

import torch

from lemoe import LEMoEConfig
from lemoe.subject_router import SubjectRelationRouter

E = torch.eye(8)
NO_NEGATIVES: list[torch.Tensor] = []


def _router(**config) -> SubjectRelationRouter:
    router = SubjectRelationRouter(8, LEMoEConfig(**{"subject_threshold": 0.7, "relation_threshold": 0.5, **config}))
    router.stats_fitted.fill_(True)  # identity standardisation: values are the normalised inputs
    return router


def _add(router: SubjectRelationRouter, expert: int, edits: list[tuple[list[int], int]]) -> None:
    """Each edit: (the basis vectors of its subject tokens, the basis vector of its relation)."""
    router.add_expert_key(expert, [E[s] for s, _ in edits], torch.stack([E[r] for _, r in edits]),
                          NO_NEGATIVES, torch.zeros(0, 8))


def test_an_edit_fires_only_where_its_subject_and_its_relation_both_match():
    router = _router()
    _add(router, 0, [([0, 1], 6)])  # subject: tokens 0 and 1; relation 6
    queries = [
        (E[[0, 1, 5]], E[6]),  # the subject among other words, the same relation: a rephrase
        (E[[2, 5]], E[6]),  # another subject, the same relation: a neighbour
        (E[[0, 1]], E[7]),  # the same subject, another relation: a same-subject question
        (E[[0, 5]], E[6]),  # half of the subject: mean MaxSim 0.5 < 0.7
    ]
    route = router.route([q for q, _ in queries], torch.stack([r for _, r in queries]), 1, True)
    assert route.top1() == [0, None, None, None]
    subject, relation = router.scores([q for q, _ in queries], torch.stack([r for _, r in queries]))
    assert subject[:, 0].tolist() == [1.0, 0.0, 1.0, 0.5] and relation[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert router.route([E[[2]]], E[[7]], 1, False).top1() == [0]  # without deferral everything is routed


def test_the_best_relation_wins_and_the_newest_of_equals():
    router = _router(relation_threshold=0.1)
    _add(router, 0, [([0], 6)])
    _add(router, 1, [([0], 7)])
    leaning = _unit(E[6] + 0.5 * E[7])
    assert router.route([E[[0]]], leaning[None], 1, True).top1() == [0]
    _add(router, 2, [([0], 6)])  # the same fact edited again: the newer expert overrides
    assert router.route([E[[0]]], E[[6]], 1, True).top1() == [2]
    two = router.route([E[[0]]], leaning[None], 2, True)
    assert two.experts[0].tolist() == [2, 0] and abs(float(two.gates.sum()) - 1) < 1e-6


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_truncate_drops_newer_experts_and_keeps_older_keys_bit_identical():
    router = _router()
    _add(router, 0, [([0, 1], 6), ([2], 7)])
    kept = {name: buf.clone() for name, buf in router.named_buffers()}
    _add(router, 1, [([3, 4, 5], 6)])
    assert router.num_experts == 2 and router.num_edits == 3 and router.subject_tokens.shape[0] == 6
    router.truncate(1)
    for name, buf in router.named_buffers():
        assert torch.equal(buf, kept[name]), name
    assert router.route([E[[3, 4, 5]]], E[[6]], 1, True).top1() == [None]


def test_every_stored_edit_routes_home_through_its_own_keys():
    router = _router()
    _add(router, 0, [([0], 6), ([1], 6)])
    _add(router, 1, [([2], 7), ([0], 7)])  # the first subject again, with another relation
    assert router.consistency() == 1.0
    assert _router().consistency() != _router().consistency()  # nan: nothing stored


def test_the_acceptance_report_counts_the_generic_negatives_it_rejects():
    router = _router()
    fit = router.add_expert_key(0, [E[[0]]], E[[6]], [E[[0]], E[[3]]], torch.stack([E[6], E[6]]))
    assert fit.negatives_rejected == 0.5 and fit.max_negative == 1.0
