"""Order planning: which edits share a batch, and in what order the batches are applied.

Modes:
- `stream`: the records' own order, cut into batches of B.
- `random`: a seeded permutation, cut into batches of B.
- `cluster` (LEMoE's order planning): K-means on the prompts' embeddings groups similar edits
  into the same batch, and batches are ordered so that consecutive ones are far apart.

The embedding is the router's own value space (mean of the edited layer's FFN inputs over the
prompt, standardised, unit-normalised): clustering there puts into one expert exactly the edits
that the router finds alike, which is what keeps similar prompts from competing across experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

OrderMode = Literal["stream", "random", "cluster"]
ORDER_MODES = ("stream", "random", "cluster")


@dataclass
class OrderPlan:
    """Batches as lists of record indices, in application order, and how similar they are."""

    mode: str
    batches: list[list[int]]
    within_batch_similarity: float  # mean pairwise cosine of prompts inside a batch
    between_batch_similarity: float  # mean cosine of consecutive batches' centroids

    @property
    def order(self) -> list[int]:
        return [i for batch in self.batches for i in batch]


def standardise(vectors: torch.Tensor) -> torch.Tensor:
    """(n, d) -> unit vectors after per-dimension standardisation: removes the shared direction."""
    centred = (vectors - vectors.mean(dim=0)) / vectors.std(dim=0).clamp(min=1e-4)
    return F.normalize(centred, dim=-1)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """Seeded K-means++ on unit vectors with cosine similarity; (n,) cluster labels, deterministic."""
    n = points.shape[0]
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        sims = points @ points[centres].T  # (n, c)
        distance = (1 - sims.max(dim=1).values).clamp(min=0)
        if float(distance.sum()) == 0.0:
            centres.append(int(torch.randint(n, (1,), generator=generator)))
            continue
        centres.append(int(torch.multinomial(distance, 1, generator=generator)))
    centroids = points[centres].clone()  # (k, d)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new_labels = (points @ centroids.T).argmax(dim=1)
        if torch.equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        for c in range(k):
            members = points[labels == c]
            if members.shape[0]:
                centroids[c] = F.normalize(members.mean(dim=0), dim=0)
    return labels


def plan_order(
    embeddings: torch.Tensor, batch_size: int, mode: str, seed: int = 0
) -> OrderPlan:
    """Plan the batches of `len(embeddings)` edits; `embeddings` (n, d) are raw prompt vectors."""
    if mode not in ORDER_MODES:
        raise ValueError(f"order must be one of {ORDER_MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = embeddings.shape[0]
    points = standardise(embeddings.float()) if n > 1 else F.normalize(embeddings.float(), dim=-1)
    if mode == "stream":
        order = list(range(n))
        batches = _chunks(order, batch_size)
    elif mode == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        batches = _chunks(order, batch_size)
    else:
        batches = _cluster_batches(points, batch_size, seed)
    return OrderPlan(mode, batches, *_similarities(points, batches))


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def _cluster_batches(points: torch.Tensor, batch_size: int, seed: int) -> list[list[int]]:
    n = points.shape[0]
    num_batches = -(-n // batch_size)
    labels = kmeans(points, num_batches, seed)
    # members of one cluster stay together, each cluster ordered by closeness to its centre
    order: list[int] = []
    for c in sorted(set(labels.tolist())):
        members = (labels == c).nonzero().flatten()
        centre = F.normalize(points[members].mean(dim=0), dim=0)
        ranked = members[(points[members] @ centre).argsort(descending=True)]
        order.extend(ranked.tolist())
    batches = _chunks(order, batch_size)
    # greedy: each next batch is the one least similar to the batch just applied
    centroids = torch.stack([F.normalize(points[b].mean(dim=0), dim=0) for b in batches])  # (m, d)
    sequence, remaining = [0], set(range(1, len(batches)))
    while remaining:
        last = centroids[sequence[-1]]
        nxt = min(remaining, key=lambda j: (float(centroids[j] @ last), j))
        sequence.append(nxt)
        remaining.remove(nxt)
    return [batches[j] for j in sequence]


def _similarities(points: torch.Tensor, batches: list[list[int]]) -> tuple[float, float]:
    within = []
    for batch in batches:
        if len(batch) > 1:
            sims = points[batch] @ points[batch].T
            m = len(batch)
            within.append(float((sims.sum() - sims.diagonal().sum()) / (m * (m - 1))))
    centroids = [F.normalize(points[b].mean(dim=0), dim=0) for b in batches]
    between = [float(a @ b) for a, b in zip(centroids, centroids[1:])]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return mean(within), mean(between)
