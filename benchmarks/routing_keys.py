"""Routing alone, without training (issue 12): how often rephrases and chat questions reach their own
edit against how often neighbours, same-subject questions and unrelated prompts are deferred, for
candidate routing keys, as a curve over the threshold and its area.

    python benchmarks/routing_keys.py --out results/routing_keys.json [--n 150] [--layers 2,3,5,8]

Each pool is a data set's first N development records, routed among their own N edit prompts (one
anchor per edit, as a stream of N edits would hold). A positive probe succeeds when its own edit is
the best-scoring anchor and reaches the threshold; a negative succeeds when no anchor reaches it.
Token states are the FFN inputs of a layer, standardised with statistics from the first 10 edits'
tokens and lemoe's generic negatives (as the router fixes them at the first edit), unit-normalised.

Keys (q: the query's content tokens; e: the edit prompt's content tokens, S its subject tokens, R the rest):
- pooled_all: today's key: the mean of all prompt tokens (template and chat tokens included).
- pooled_content: the mean of content tokens only (no first token, no special or chat-template tokens).
- subject: mean over s in S of max over q of cos(s, q) (MaxSim, as late-interaction retrieval).
- relation: MaxSim over R, each token weighted by how unlike every generic-negative token it is.
- last: cos of the last content tokens.
- subject&relation / subject&last: both must pass: min of the two scores (one threshold).
- nonsubject (two-stage only, e.g. 1:nonsubject@5): the mean state of the edit's non-subject content tokens
  against the mean over the query's content tokens that do not match that edit's subject.
- lastword (two-stage only, e.g. 1:lastword@5): the state of the edit's last content token that is neither
  its subject nor a function word, against the same token of the query (query tokens that match that edit's
  subject skipped): the relation's own last word, which questions and cloze prompts share.
- words (two-stage only, e.g. 1:words@3): as nonsubject, over content tokens that are not function words
  either: the relation's own words ("capital"), not the sentence's form ("What is the ... of ?" / "... is").
- A+B (two-stage only, e.g. 1:last@5+words@3): the mean of two relation scores.

--two-stage S:KEY@L routes with two thresholds (subject at layer S, the relation key at layer L); with
--bank, a second two-stage variant offsets each edit's relation score by the best score its own subject
reaches in other relations (lemoe/resources/relation_templates.json filled with the edit's subject; a
template scoring >= BANK_SAME against the edit is taken for the edit's own relation and skipped): an
edit-specific relation threshold, measured here before the router uses it.

The router uses one threshold pair for every edit, whatever its data set, so each two-stage key is also
scored across pools: the threshold pair with the best worst case over every pool's kinds (`across_pools`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json  # noqa: E402

from lemoe.config import LEMoEConfig  # noqa: E402
from lemoe.data import read_edits  # noqa: E402
from lemoe.demo import demo_edits  # noqa: E402
from lemoe.editor import builtin_negatives  # noqa: E402
from lemoe.encoding import pad_id, pad_sequences  # noqa: E402
from lemoe.models import decoder_layers, find_layout, load_model  # noqa: E402
from lemoe.probe_metrics import chat_question  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POOLS = {  # name: (file, positive kinds, negative kinds)
    "zsre_mend": ("zsre/zsre_mend_dev.json", ("rephrase", "chat"), ("unrelated",)),
    "knowedit_zsre": ("zsre/knowedit_zsre_test.json", ("rephrase", "chat"), ("same_subject",)),
    "counterfact_rome": ("counterfact/counterfact_rome_format_dev.json", ("rephrase",), ("neighbour",)),
    "knowedit_wiki_cf": ("knowedit/knowedit_wiki_counterfact_train.json", ("subject_aliasing",), ("same_subject",)),
    "demo": (None, ("rephrase", "chat"), ("neighbour", "same_subject")),
}
PER_KIND = 3  # probes of one kind per record at most
BANK_SAME = 0.8  # a bank question scoring this high against an edit asks the edit's own relation
NONSUBJECT_TAU = 0.7  # a query token matching an edit's subject this well is that subject (nonsubject key)


class Tokens:
    """One text's token ids, its content positions and its subject positions."""

    def __init__(self, ids: list[int], content: list[int], subject: list[int]) -> None:
        self.ids, self.content, self.subject = ids, content, subject
        self.states: dict[int, torch.Tensor] = {}  # layer -> (T, d)


def chat_skeleton(tok: Any) -> tuple[list[int], list[int]] | None:
    """The chat template's fixed prefix and suffix around a user message (None without a template)."""
    if not getattr(tok, "chat_template", None):
        return None
    marker = "Zq"
    ids = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    inner = tok(marker, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(inner) + 1):
        if ids[start : start + len(inner)] == inner:
            return ids[:start], ids[start + len(inner) :]
    return None


SINK: list[int] = []  # --sink: a token put before every text, so its first word is not the attention sink


SPACE: list[str] = []  # --space: " " before every text, so a first word gets the token it has mid-sentence


def plain(tok: Any, text: str, subject: str | None) -> Tokens:
    text = (SPACE[0] + text.lstrip()) if SPACE else text
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = SINK + list(enc["input_ids"]), [(0, 0)] * len(SINK) + list(enc["offset_mapping"])
    special = set(tok.all_special_ids)
    content = [i for i, t in enumerate(ids) if i > 0 and t not in special]
    span = _span(text, subject)
    subj = [i for i in content if span and offsets[i][0] < span[1] and offsets[i][1] > span[0]]
    return Tokens(ids, content, subj)


def chatted(tok: Any, text: str, skeleton: tuple[list[int], list[int]]) -> Tokens:
    prefix, suffix = skeleton
    inner = tok((SPACE[0] + text.lstrip()) if SPACE else text, add_special_tokens=False)["input_ids"]
    ids = SINK + prefix + list(inner) + suffix
    start = len(SINK) + len(prefix)
    return Tokens(ids, list(range(start, start + len(inner))), [])


def _span(text: str, subject: str | None) -> tuple[int, int] | None:
    if not subject:
        return None
    at = text.find(subject)
    if at < 0:
        at = text.lower().find(subject.lower())
    return (at, at + len(subject)) if at >= 0 else None


@torch.no_grad()
def fill_states(model: Any, tok: Any, items: list[Tokens], layers: list[int], batch_size: int = 32) -> None:
    ffns = [getattr(decoder_layers(model)[i], find_layout(model).mlp_attr) for i in layers]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, mask = pad_sequences([t.ids for t in chunk], pad_id(tok), left_pad=False)
        grabbed: dict[int, torch.Tensor] = {}
        hooks = [ffn.register_forward_pre_hook(lambda m, a, layer=layer: grabbed.__setitem__(layer, a[0].detach()))
                 for layer, ffn in zip(layers, ffns)]
        try:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for row, item in enumerate(chunk):
            for layer in layers:
                item.states[layer] = grabbed[layer][row, : len(item.ids)].float()


def units(states: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    return F.normalize((states - mu) / sd, dim=-1)


def build_pool(tok: Any, records: list[Any], positives: tuple[str, ...], negatives: tuple[str, ...],
               skeleton: Any) -> dict[str, Any]:
    edits = [plain(tok, r.prompt, r.subject) for r in records]
    probes: dict[str, list[tuple[int, Tokens]]] = {}
    for kind in (*positives, *negatives):
        found = []
        for i, r in enumerate(records):
            if kind == "chat":
                if skeleton is not None:
                    found.append((i, chatted(tok, chat_question(r), skeleton)))
                continue
            for p in r.probes_of(kind)[:PER_KIND]:
                found.append((i, plain(tok, p.prompt, None)))
        if found:
            probes[kind] = found
    subject_found = sum(bool(e.subject) for e in edits) / len(edits)
    return {"edits": edits, "probes": probes, "positives": [k for k in positives if k in probes],
            "negatives": [k for k in negatives if k in probes], "subject_located": subject_found}


def score_matrix(key: str, queries: list[Tokens], edits: list[Tokens], layer: int, stats: Any,
                 weight_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(Q, E) score of every query against every edit."""
    mu, sd, pooled_mu, pooled_sd = stats
    if key.startswith("pooled"):
        def vec(t: Tokens) -> torch.Tensor:
            rows = t.states[layer] if key == "pooled_all" else t.states[layer][t.content]
            return rows.mean(0)
        q = F.normalize((torch.stack([vec(t) for t in queries]) - pooled_mu) / pooled_sd, dim=-1)
        e = F.normalize((torch.stack([vec(t) for t in edits]) - pooled_mu) / pooled_sd, dim=-1)
        return q @ e.T
    if key == "last":
        q = torch.stack([units(t.states[layer][t.content[-1]], mu, sd) for t in queries])
        e = torch.stack([units(t.states[layer][t.content[-1]], mu, sd) for t in edits])
        return q @ e.T
    if "&" in key:
        a, b = key.split("&")
        return torch.minimum(score_matrix(a, queries, edits, layer, stats, weight_of),
                             score_matrix(b, queries, edits, layer, stats, weight_of))
    out = torch.zeros(len(queries), len(edits))
    q_units = [units(t.states[layer][t.content], mu, sd) for t in queries]
    for j, e in enumerate(edits):
        if key == "subject":
            positions = e.subject or e.content
        else:  # relation
            positions = [p for p in e.content if p not in e.subject] or e.content
        keys = units(e.states[layer][positions], mu, sd)  # (k, d)
        w = weight_of(keys) if key == "relation" else torch.ones(len(positions))
        for i, q in enumerate(q_units):
            best = (keys @ q.T).amax(dim=1)  # (k,)
            out[i, j] = float((best * w).sum() / w.sum().clamp(min=1e-6))
    return out


def subject_match(queries_item: Tokens, edits: list[Tokens], subject_layer: int, all_stats: dict[int, Any]
                  ) -> torch.Tensor:
    """(m, E) best cosine at `subject_layer` between each content token of the query and each edit's subject
    tokens (MaxSim's inner max): >= NONSUBJECT_TAU marks the token as that edit's subject."""
    mu1, sd1 = all_stats[subject_layer][:2]
    subj = [units(e.states[subject_layer][e.subject or e.content], mu1, sd1) for e in edits]
    owner = torch.cat([torch.full((len(s),), j) for j, s in enumerate(subj)])  # (K,)
    q1 = units(queries_item.states[subject_layer][queries_item.content], mu1, sd1)  # (m, d)
    sims = q1 @ torch.cat(subj).T  # (m, K)
    return torch.full((len(queries_item.content), len(edits)), -2.0).scatter_reduce(
        1, owner.expand(len(queries_item.content), -1), sims, reduce="amax")  # (m, E)


def nonsubject_matrix(queries: list[Tokens], edits: list[Tokens], subject_layer: int, layer: int,
                      all_stats: dict[int, Any], tau: float = NONSUBJECT_TAU, tok: Any = None) -> torch.Tensor:
    """(Q, E) relation score that ignores each edit's subject wherever the query names it: the mean unit state
    at `layer` of the edit's content tokens other than its subject, against the mean over the query's
    content tokens that do not match that edit's subject (MaxSim cosine >= tau at `subject_layer`). With
    `tok`, function words and punctuation are left out on both sides too (the `words` key)."""
    mu, sd = all_stats[layer][:2]
    rel = []
    for e in edits:
        words = word_mask(tok, e).tolist() if tok is not None else [True] * len(e.content)
        rest = [p for p, w in zip(e.content, words) if w and p not in e.subject] or e.content
        rel.append(units(e.states[layer][rest], mu, sd).mean(0))
    rel_keys = F.normalize(torch.stack(rel), dim=-1)  # (E, d)
    out = torch.zeros(len(queries), len(edits))
    for i, q in enumerate(queries):
        keep = subject_match(q, edits, subject_layer, all_stats) < tau  # (m, E) True: not its subject
        if tok is not None:
            keep = keep & word_mask(tok, q)[:, None]
        keep = keep.float()
        keep = torch.where(keep.sum(0, keepdim=True) > 0, keep, torch.ones_like(keep))
        ql = units(q.states[layer][q.content], mu, sd)  # (m, d)
        vec = F.normalize((keep.T @ ql) / keep.sum(0)[:, None], dim=-1)  # (E, d)
        out[i] = (vec * rel_keys).sum(-1)
    return out


FUNCTION_WORDS = frozenset("""is was are were be been being am does did do has have had the a an of in on at to by
with for from as into about which who whom whose what when where that this and or ? . , ' 's""".split())


def word_mask(tok: Any, t: Tokens) -> torch.Tensor:
    """(m,) True on the content tokens of `t` that are not function words or punctuation."""
    return torch.tensor([tok.decode([t.ids[p]]).strip().lower() not in FUNCTION_WORDS for p in t.content])


def lastword_matrix(tok: Any, queries: list[Tokens], edits: list[Tokens], subject_layer: int, layer: int,
                    all_stats: dict[int, Any], tau: float = NONSUBJECT_TAU) -> torch.Tensor:
    """(Q, E) relation score from the relation's own last word, which a question and its cloze form share
    ("What is the capital of France?" and "The capital of France is" both end their relation on "capital"):
    the unit state at `layer` of the edit's last content token that is neither its subject nor a function
    word, against the same token of the query, skipping the query tokens that match that edit's subject
    (MaxSim cosine >= tau at `subject_layer`). Falls back to the last content token where none is left."""
    mu, sd = all_stats[layer][:2]
    keys = []
    for e in edits:
        words = word_mask(tok, e)
        chosen = [p for p, w in zip(e.content, words.tolist()) if w and p not in e.subject]
        keys.append(units(e.states[layer][(chosen or e.content)[-1]], mu, sd))
    rel_keys = torch.stack(keys)  # (E, d)
    out = torch.zeros(len(queries), len(edits))
    for i, q in enumerate(queries):
        keep = (subject_match(q, edits, subject_layer, all_stats) < tau) & word_mask(tok, q)[:, None]  # (m, E)
        index = torch.arange(len(q.content))[:, None].expand_as(keep)
        last = torch.where(keep, index, -1).amax(dim=0)  # (E,)
        last = torch.where(last >= 0, last, len(q.content) - 1)
        ql = units(q.states[layer][q.content], mu, sd)  # (m, d)
        out[i] = (ql[last] * rel_keys).sum(-1)
    return out


def relation_scores(tok: Any, pool: dict[str, Any], key: str, layer: int, subject_layer: int,
                    all_stats: dict[int, Any], weights: dict[int, Any]) -> dict[str, torch.Tensor]:
    """(Q, E) per probe kind for one key at one layer (two-stage keys included)."""
    scores = {}
    for kind, probes in pool["probes"].items():
        queries = [t for _, t in probes]
        if key == "lastword":
            scores[kind] = lastword_matrix(tok, queries, pool["edits"], subject_layer, layer, all_stats)
        elif key in ("nonsubject", "words"):
            scores[kind] = nonsubject_matrix(queries, pool["edits"], subject_layer, layer, all_stats,
                                             tok=tok if key == "words" else None)
        else:
            scores[kind] = score_matrix(key, queries, pool["edits"], layer, all_stats[layer], weights[layer])
    return scores


def curve(pos_best: torch.Tensor, pos_home: torch.Tensor, neg_best: torch.Tensor) -> dict[str, Any]:
    """Over thresholds: share of positives routed home, share of negatives deferred; the area under it."""
    grid = torch.linspace(-0.2, 1.0, 121)
    routed = [float(((pos_best >= t) & pos_home).float().mean()) for t in grid]
    deferred = [float((neg_best < t).float().mean()) for t in grid]
    area = 0.0
    points = sorted(zip(deferred, routed))
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        area += (x1 - x0) * (y0 + y1) / 2
    best = max(range(len(grid)), key=lambda k: min(routed[k], deferred[k]))
    return {"area": area, "balanced": min(routed[best], deferred[best]), "threshold": float(grid[best]),
            "routed_at_balance": routed[best], "deferred_at_balance": deferred[best],
            "home_ceiling": float(pos_home.float().mean())}


def two_stage(subject: dict[str, torch.Tensor], relation: dict[str, torch.Tensor], pool: dict[str, Any],
              low: float = -0.2, high: float = 1.0) -> dict[str, Any]:
    """An edit fires when its subject score and its relation score both reach their thresholds; among the
    edits that fire, the best relation score wins. Over a grid of both thresholds, per (positive, negative)
    pair: the best balanced point, min(routed home, deferred)."""
    grid_s, grid_r = torch.linspace(0.0, 1.0, 41), torch.linspace(low, high, 49)
    out: dict[str, Any] = {}
    outcome: dict[str, torch.Tensor] = {}
    for kind, probes in pool["probes"].items():
        s, r = subject[kind], relation[kind]  # (Q, E)
        own = torch.tensor([i for i, _ in probes])
        fires = (s[None, None] >= grid_s[:, None, None, None]) & (r[None, None] >= grid_r[None, :, None, None])
        ranked = torch.where(fires, r[None, None].expand_as(fires), torch.full_like(fires, -9.0, dtype=r.dtype))
        best, arg = ranked.max(dim=-1)  # (S, R, Q)
        any_fires = best > -9.0
        if kind in pool["positives"]:
            outcome[kind] = (any_fires & (arg == own)).float().mean(-1)  # (S, R) routed home
        else:
            outcome[kind] = (~any_fires).float().mean(-1)  # (S, R) deferred
    for pos in pool["positives"]:
        for neg in pool["negatives"]:
            balanced = torch.minimum(outcome[pos], outcome[neg])
            k = int(balanced.argmax())
            i, j = divmod(k, len(grid_r))
            out[f"{pos}|{neg}"] = {"balanced": float(balanced.max()), "routed": float(outcome[pos][i, j]),
                                   "deferred": float(outcome[neg][i, j]), "t_subject": float(grid_s[i]),
                                   "t_relation": float(grid_r[j])}
    # one threshold pair for every pair at once: the best worst case over all of them
    worst = torch.stack([outcome[k] for k in outcome]).amin(0)
    k = int(worst.argmax())
    i, j = divmod(k, len(grid_r))
    out["all"] = {"worst": float(worst.max()), "t_subject": float(grid_s[i]), "t_relation": float(grid_r[j]),
                  **{kind: float(v[i, j]) for kind, v in outcome.items()}}
    out["outcome"] = outcome  # (S, R) per kind, for the across-pools score; not written to JSON
    return out


def across_pools(outcomes: dict[str, dict[str, torch.Tensor]], low: float = -0.2, high: float = 1.0
                 ) -> dict[str, Any]:
    """One threshold pair for every pool, as the router has: the pair with the best worst case over every
    pool's kinds (each (S, R) grid as `two_stage` makes them), and each pool's kinds at that pair."""
    grid_s, grid_r = torch.linspace(0.0, 1.0, 41), torch.linspace(low, high, 49)
    worst = torch.stack([v for kinds in outcomes.values() for v in kinds.values()]).amin(0)  # (S, R)
    mean = torch.stack([torch.stack(list(kinds.values())).amin(0) for kinds in outcomes.values()]).mean(0)
    i, j = divmod(int(worst.argmax()), len(grid_r))
    m_i, m_j = divmod(int(mean.argmax()), len(grid_r))
    default = LEMoEConfig()
    d_i = int((grid_s - default.subject_threshold).abs().argmin())
    d_j = int((grid_r - default.relation_threshold).abs().argmin())
    return {"worst": float(worst.max()), "t_subject": float(grid_s[i]), "t_relation": float(grid_r[j]),
            "at_worst": {pool: {kind: float(v[i, j]) for kind, v in kinds.items()} for pool, kinds in outcomes.items()},
            "mean_of_pool_worsts": float(mean.max()), "t_mean": [float(grid_s[m_i]), float(grid_r[m_j])],
            "at_mean": {pool: {kind: float(v[m_i, m_j]) for kind, v in kinds.items()}
                        for pool, kinds in outcomes.items()},
            "t_default": [float(grid_s[d_i]), float(grid_r[d_j])],  # lemoe's default thresholds, on the grid
            "at_default": {pool: {kind: float(v[d_i, d_j]) for kind, v in kinds.items()}
                           for pool, kinds in outcomes.items()}}


def bank_offsets(tok: Any, pool: dict[str, Any], records: list[Any], key: str, layer: int, stats: Any,
                 weight_of: Callable[[torch.Tensor], torch.Tensor], model: Any, layers: list[int]) -> torch.Tensor:
    """(E,) per edit: the best relation score of its subject asked in another relation (0 when none)."""
    import json as _json
    from importlib import resources

    templates = _json.loads(resources.files("lemoe").joinpath("resources/relation_templates.json").read_text())[
        "templates"]
    offsets = torch.zeros(len(records))
    for j, (record, edit) in enumerate(zip(records, pool["edits"])):
        if not record.subject:
            continue
        bank = [plain(tok, t.format(record.subject), record.subject) for t in templates]
        fill_states(model, tok, bank, layers)
        scores = score_matrix(key, bank, [edit], layer, stats, weight_of)[:, 0]  # (B,)
        others = scores[scores < BANK_SAME]
        offsets[j] = float(others.max()) if len(others) else 0.0
    return offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/routing_keys.json")
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--layers", default="2,3,5,8")
    parser.add_argument("--keys", default="pooled_all,pooled_content,subject,relation,last,subject&relation,"
                                          "subject&last")
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sink", action="store_true", help="put the end-of-text token before every text")
    parser.add_argument("--space", action="store_true", help="put a space before every text")
    parser.add_argument("--two-stage", default="", help="SUBJECT_LAYER:RELATION_KEY@LAYER,... e.g. 1:last@8")
    parser.add_argument("--bank", action="store_true",
                        help="with --two-stage: also the variant with per-edit relation offsets from the bank")
    args = parser.parse_args()
    if args.bank and "+" in args.two_stage:
        parser.error("--bank offsets one relation key; it does not apply to a mixed key (A+B)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tok = load_model()
    model.eval()
    layers = [int(x) for x in args.layers.split(",")]
    skeleton = chat_skeleton(tok)
    if args.space:
        SPACE.append(" ")
    if args.sink:
        SINK.append(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    negative_tokens = [plain(tok, text, None) for text in builtin_negatives()]
    fill_states(model, tok, negative_tokens, layers)
    result: dict[str, Any] = {**header("routing_keys", args), "threads": args.threads, "n": args.n, "sink": SINK, "space": bool(SPACE),
                              "layers": layers, "pools": {}}
    outcomes: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # spec -> pool -> kind -> (S, R)
    for name in args.pools.split(","):
        file, positives, negatives = POOLS[name]
        records = demo_edits() if file is None else read_edits(SHARED_DATA / file)[: args.n]
        pool = build_pool(tok, records, positives, negatives, skeleton)
        everything = pool["edits"] + [t for probes in pool["probes"].values() for _, t in probes]
        fill_states(model, tok, everything, layers)
        pool_result: dict[str, Any] = {"records": len(records), "subject_located": pool["subject_located"],
                                       "probes": {k: len(v) for k, v in pool["probes"].items()}, "keys": {},
                                       "two_stage": {}}
        weights: dict[int, Any] = {}
        all_stats: dict[int, Any] = {}
        for layer in layers:
            tokens = torch.cat([t.states[layer][t.content] for t in pool["edits"][:10] + negative_tokens])
            mu, sd = tokens.mean(0), tokens.std(0).clamp(min=1e-4)
            pooled = torch.stack([t.states[layer].mean(0) for t in pool["edits"][:10] + negative_tokens])
            stats = (mu, sd, pooled.mean(0), pooled.std(0).clamp(min=1e-4))
            generic = torch.cat([units(t.states[layer][t.content], mu, sd) for t in negative_tokens])  # (G, d)

            def weight_of(keys: torch.Tensor) -> torch.Tensor:
                return (1 - (keys @ generic.T).amax(dim=1)).clamp(min=0)  # distinct from generic text

            for key in args.keys.split(","):
                scores = {kind: score_matrix(key, [t for _, t in probes], pool["edits"], layer, stats, weight_of)
                          for kind, probes in pool["probes"].items()}
                entry: dict[str, Any] = {}
                for pos in pool["positives"]:
                    own = torch.tensor([i for i, _ in pool["probes"][pos]])
                    s = scores[pos]
                    best, arg = s.max(dim=1)
                    for neg in pool["negatives"]:
                        entry[f"{pos}|{neg}"] = curve(best, arg == own, scores[neg].max(dim=1).values)
                pool_result["keys"][f"{key}@{layer}"] = entry
            weights[layer] = weight_of
            all_stats[layer] = stats
        for spec in filter(None, args.two_stage.split(",")):
            subject_layer, relation = spec.split(":")
            subject = relation_scores(tok, pool, "subject", int(subject_layer), int(subject_layer), all_stats,
                                      weights)
            parts = [relation_scores(tok, pool, part.split("@")[0], int(part.split("@")[1]), int(subject_layer),
                                     all_stats, weights) for part in relation.split("+")]
            mixed = {kind: torch.stack([part[kind] for part in parts]).mean(0) for kind in subject}
            entry = two_stage(subject, mixed, pool)
            outcomes.setdefault(spec, {})[name] = entry.pop("outcome")
            pool_result["two_stage"][spec] = entry
            if args.bank:  # one relation key here (checked at start)
                relation_key, relation_layer = relation.split("@")
                offsets = bank_offsets(tok, pool, records, relation_key, int(relation_layer),
                                       all_stats[int(relation_layer)], weights[int(relation_layer)], model, layers)
                shifted = {kind: m - offsets[None, :] for kind, m in mixed.items()}
                banked = two_stage(subject, shifted, pool, -0.6, 0.6)
                banked.pop("outcome")
                pool_result["two_stage"][spec + "+bank"] = banked
                pool_result["bank_offset_mean"] = float(offsets.mean())
        result["pools"][name] = pool_result
        print(f"{name}: done ({time.perf_counter() - started:.0f}s)", flush=True)
    result["across_pools"] = {spec: across_pools(by_pool) for spec, by_pool in outcomes.items()}
    result["seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    for name, pool_result in result["pools"].items():
        print(f"\n{name} (subject located {pool_result['subject_located']:.2f}; probes {pool_result['probes']})")
        for key, entry in pool_result["keys"].items():
            cells = "  ".join(f"{pair}: auc {c['area']:.3f} bal {c['balanced']:.3f}" for pair, c in entry.items())
            print(f"  {key:28s} {cells}")
        for spec, entry in pool_result["two_stage"].items():
            cells = "  ".join(f"{pair}: bal {c['balanced']:.3f}" for pair, c in entry.items() if pair != "all")
            print(f"  two-stage {spec:18s} {cells}  | one pair for all: {entry['all']}")
    for spec, entry in result["across_pools"].items():
        print(f"\nacross pools {spec}: worst {entry['worst']:.3f} at ({entry['t_subject']:.3f}, "
              f"{entry['t_relation']:.3f}); mean of pool worsts {entry['mean_of_pool_worsts']:.3f} at {entry['t_mean']}")
        for pool_name, kinds in entry["at_worst"].items():
            print(f"  {pool_name:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
        print(f"  at lemoe's default thresholds {entry['t_default']}:")
        for pool_name, kinds in entry["at_default"].items():
            print(f"  {pool_name:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in kinds.items()))


if __name__ == "__main__":
    main()
