"""Probe metrics per probe kind (issue 11): generative (what a user sees from greedy decoding) and
teacher-forced (EasyEdit's definitions on every probe, so papers compare).

Definitions (protocol `generative`, greedy decoding through `model.generate`):
- `rel_gen`: the prompt's continuation starts with the target's tokens.
- `gen_gen`: a rephrase's continuation of (target length + 8) tokens contains the target (case-insensitive);
  per edit, the mean over its rephrases.
- `chat_gen`: the first rephrase (or the prompt) sent as a user message through the tokenizer's chat
  template with the generation prompt; 32 new tokens contain the target. None without a chat template.
- `chat_clean`: the same reply ends its turn within the 32 tokens (the tokenizer's end of sequence or the
  template's end of turn), and what comes before the end contains the target: the answer a chat user
  reads, without the model running on (repeating the answer, or into another fact).
- `loc_gen_<kind>`: a locality probe's 8-token continuation is the unedited model's; per edit, the mean
  over its probes of that kind.
- `leak`: the prompt's 24-token continuation contains another edit's target (one not inside this
  edit's own target), case-insensitive. Reported for the unedited model too (`leak_unedited`).
- `fluency`: ROME's generation entropy, the weighted mean of bi- and tri-gram entropies (weights 2/3 and
  4/3, bits) of the 64-token greedy continuation of the record's first generation prompt (the prompt
  itself when it has none). ROME samples 100 tokens and splits words with NLTK; we decode greedily and
  split words with a regular expression, so compare our values with each other, not with ROME's.
Per edit first, then the mean over the edits where a metric is defined (macro average). Every
generative metric is also taken on the unedited model, once, before any edit (`unedited`).

Protocol `teacher-forced probability` (`ProbabilityScores`): CounterFact's scores as ROME, MEMIT and
AlphaEdit report them, for records that name the fact before the edit (`target_true`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from torch import nn

from .data import EditRecord
from .encoding import chat_prompt_ids, encode_answer, end_of_turn_ids
from .metrics import agreement, answer_predictions, greedy_from_ids, score_answers, token_accuracy
from .probes import GENERATION, LOCALITY_KINDS, PORTABILITY_KINDS, QUESTION, REPHRASE

LOC_TOKENS = 8
GEN_EXTRA_TOKENS = 8
CHAT_TOKENS = 32
LEAK_TOKENS = 24
FLUENCY_TOKENS = 64
GENERATIVE_KEYS = ("rel_gen", "gen_gen", "chat_gen", "chat_clean", *(f"loc_gen_{k}" for k in LOCALITY_KINDS), "leak",
                   "fluency")


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


class DeferralRouter(Protocol):
    """An editor whose deferred inputs get exactly the unedited model's output (lemoe's routed experts)."""

    def route_ids(self, sequences: Sequence[Sequence[int]]) -> list[int | None]: ...


@dataclass
class _Job:
    edit: int
    key: str  # "rel", "gen", "chat", "leak" or a locality kind
    ids: list[int]
    steps: int


class ProbeEvaluator:
    """Generative scores of every probe of `records`; the unedited model's outputs (every probe's
    continuation, the leak rate) are taken once, at construction (before any edit).

    Given a `DeferralRouter`, probes that every expert defers are not decoded again: their continuation is
    the unedited model's by construction (tests/test_probe_metrics.py checks both ways agree). On
    locality probes, mostly deferred, this halves the cost of a run."""

    def __init__(self, model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.records, self.batch_size = model, tokenizer, list(records), batch_size
        self.targets = [encode_answer(tokenizer, r.target) for r in self.records]
        self.turn_ends = end_of_turn_ids(tokenizer)
        self._unedited_outputs: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (ids, steps) -> tokens
        self._recording = True  # while the model is unedited, below
        self.decoded_last = 0  # continuations the last `evaluate` decoded (the rest: deferred, reused)
        self._router: DeferralRouter | None = None
        self.unedited_loc = self._locality_continuations(range(len(self.records)))
        self.unedited = self._evaluate(range(len(self.records)), None, self.unedited_loc)  # loc_gen_*: 1.0
        self.leak_unedited = dict(enumerate(self.unedited["leak"]))
        self._recording = False

    # ------------------------------------------------------------------ public

    def evaluate(self, indices: Sequence[int], exact_match: Sequence[float] | None = None,
                 router: DeferralRouter | None = None) -> dict[str, list[Any]]:
        """Per edit (in `indices` order): every key of GENERATIVE_KEYS, None where a record lacks the probe.

        `exact_match`, when the caller has already decoded it for these edits (the bench's `gen_em`,
        `metrics.generative_exact_match`), is `rel_gen`'s definition, so it is taken instead of decoding
        the prompts again. `router`: reuse the unedited continuation of every probe it defers."""
        self._router, self.decoded_last = router, 0
        try:
            return self._evaluate(indices, exact_match, None)
        finally:
            self._router = None

    def _evaluate(self, indices: Sequence[int], exact_match: Sequence[float] | None,
                  locality: dict[int, dict[str, list[list[int]]]] | None) -> dict[str, list[Any]]:
        indices = list(indices)
        jobs: list[_Job] = []
        for k, i in enumerate(indices):
            record, target_len = self.records[i], len(self.targets[i])
            if exact_match is None:
                jobs.append(_Job(k, "rel", prompt_ids(self.tokenizer, record.prompt), target_len))
            for probe in record.probes_of(REPHRASE):
                jobs.append(_Job(k, "gen", prompt_ids(self.tokenizer, probe.prompt), target_len + GEN_EXTRA_TOKENS))
            chat = chat_prompt_ids(self.tokenizer, chat_question(record))
            if chat is not None:
                jobs.append(_Job(k, "chat", chat, CHAT_TOKENS))
            generation = record.probes_of(GENERATION)
            if generation:
                jobs.append(_Job(k, "fluency", prompt_ids(self.tokenizer, generation[0].prompt), FLUENCY_TOKENS))
        outputs = self._run(jobs)
        keys = ("rel", "gen", "chat", "chat_clean", "fluency")
        scores: dict[str, list[list[float]]] = {key: [[] for _ in indices] for key in keys}
        for job, tokens in zip(jobs, outputs):
            i = indices[job.edit]
            if job.key == "rel":
                hit = float(tokens[: len(self.targets[i])] == self.targets[i])
            elif job.key == "fluency":
                hit = ngram_entropy(self.tokenizer.decode(tokens, skip_special_tokens=True))
            else:
                hit = float(_contains(self.tokenizer.decode(tokens), self.records[i].target))
            if job.key == "chat":
                end = next((k for k, token in enumerate(tokens) if token in self.turn_ends), None)
                scores["chat_clean"][job.edit].append(float(end is not None and _contains(
                    self.tokenizer.decode(tokens[:end]), self.records[i].target)))
            scores[job.key][job.edit].append(hit)
        edited_loc = locality if locality is not None else self._locality_continuations(indices)
        result: dict[str, list[Any]] = {
            "rel_gen": list(exact_match) if exact_match is not None else [_mean_or_none(v) for v in scores["rel"]],
            "gen_gen": [_mean_or_none(v) for v in scores["gen"]],
            "chat_gen": [_mean_or_none(v) for v in scores["chat"]],
            "chat_clean": [_mean_or_none(v) for v in scores["chat_clean"]],
        }
        for kind in LOCALITY_KINDS:
            result[f"loc_gen_{kind}"] = [
                _mean_or_none([float(edited == unedited) for edited, unedited in
                               zip(edited_loc[i].get(kind, []), self.unedited_loc[i].get(kind, []))])
                for i in indices]
        leaks, prompt_fluency = self._leaks(indices)
        result["leak"] = [leaks[i] for i in indices]
        result["fluency"] = [_mean_or_none(v) if v else prompt_fluency.get(i) for i, v in zip(indices, scores["fluency"])]
        return result

    def leak_unedited_rate(self, indices: Sequence[int]) -> float | None:
        return _mean_or_none([self.leak_unedited[i] for i in indices])

    def unedited_scores(self, indices: Sequence[int]) -> dict[str, float | None]:
        """The unedited model's macro averages over `indices` (loc_gen_* left out: 1.0 by definition)."""
        return {key: _mean_or_none([v for i in indices if (v := self.unedited[key][i]) is not None])
                for key in GENERATIVE_KEYS if not key.startswith("loc_gen_")}

    # ------------------------------------------------------------------ pieces

    def _run(self, jobs: list[_Job]) -> list[list[int]]:
        """Greedy continuations of the jobs; recorded while the model is unedited, reused where deferred."""
        if not jobs:
            return []
        keys = [(tuple(j.ids), j.steps) for j in jobs]
        outputs: list[list[int] | None] = [None] * len(jobs)
        if self._router is not None:
            routes = self._router.route_ids([j.ids for j in jobs])
            for k, (key, route) in enumerate(zip(keys, routes)):
                if route is None and key in self._unedited_outputs:
                    outputs[k] = self._unedited_outputs[key]
        todo = [k for k, out in enumerate(outputs) if out is None]
        decoded = greedy_from_ids(self.model, self.tokenizer, [jobs[k].ids for k in todo],
                                  [jobs[k].steps for k in todo], self.batch_size) if todo else []
        self.decoded_last += len(todo)
        for k, tokens in zip(todo, decoded):
            outputs[k] = tokens
            if self._recording:
                self._unedited_outputs[keys[k]] = tokens
        return [out if out is not None else [] for out in outputs]

    def _locality_continuations(self, indices: Sequence[int] | range) -> dict[int, dict[str, list[list[int]]]]:
        jobs = [_Job(i, probe.kind, prompt_ids(self.tokenizer, probe.prompt), LOC_TOKENS)
                for i in indices for probe in self.records[i].all_probes() if probe.is_locality]
        found: dict[int, dict[str, list[list[int]]]] = {i: {} for i in indices}
        for job, tokens in zip(jobs, self._run(jobs)):
            found[job.edit].setdefault(job.key, []).append(tokens)
        return found

    def _leaks(self, indices: Sequence[int] | range) -> tuple[dict[int, float], dict[int, float]]:
        """Per edit, leak (first 24 tokens of the prompt's continuation) and, for records without a
        generation prompt, fluency (the same continuation, 64 tokens: one decoding serves both)."""
        def steps(i: int) -> int:
            return LEAK_TOKENS if self.records[i].probes_of(GENERATION) else FLUENCY_TOKENS

        jobs = [_Job(i, "leak", prompt_ids(self.tokenizer, self.records[i].prompt), steps(i)) for i in indices]
        targets = [r.target.strip().lower() for r in self.records]
        leaks, fluency = {}, {}
        for job, tokens in zip(jobs, self._run(jobs)):
            text, own = self.tokenizer.decode(tokens[:LEAK_TOKENS]).lower(), targets[job.edit]
            leaks[job.edit] = float(any(t and t != own and t not in own and t in text
                                        for j, t in enumerate(targets) if j != job.edit))
            if job.steps == FLUENCY_TOKENS:
                fluency[job.edit] = ngram_entropy(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return leaks, fluency


def chat_question(record: EditRecord) -> str:
    """What `chat_gen` asks: the record's question probe, else its first rephrase, else its prompt."""
    for kind in (QUESTION, REPHRASE):
        found = record.probes_of(kind)
        if found:
            return found[0].prompt
    return record.prompt


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: the mean of weight * entropy (bits) of each n-gram frequency distribution."""
    words = _WORD.findall(text)
    values = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
        total = sum(grams.values())
        values.append(weight * -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(values) / len(values)


def _contains(text: str, target: str) -> bool:
    return target.strip().lower() in text.lower()


def _mean_or_none(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def macro_average(scores: dict[str, list[Any]]) -> dict[str, float | None]:
    """Macro average: the mean over the edits where each metric is defined."""
    return {key: _mean_or_none([v for v in values if v is not None]) for key, values in scores.items()}


# ----------------------------------------------------------------------------- teacher-forced, per kind

TEACHER_FORCED_KEYS = ("gen_all", *(f"loc_{k}" for k in LOCALITY_KINDS), *(f"port_{k}" for k in PORTABILITY_KINDS),
                       "portability")


class TeacherForcedProbes:
    """Every probe scored as EasyEdit scores its first one, so papers compare: `gen_all` (the target's
    token accuracy on every rephrase), `loc_<kind>` (the share of a locality probe's answer positions
    where the edited model's argmax is the unedited model's, taken once at construction), `port_<kind>`
    and `portability` (the answer's token accuracy on portability probes). Per edit, then over edits."""

    def __init__(self, model: nn.Module, tokenizer: Any, records: Sequence[EditRecord]) -> None:
        self.model, self.tokenizer, self.records = model, tokenizer, list(records)
        self.locality = [(i, p) for i, r in enumerate(self.records) for p in r.all_probes()
                         if p.is_locality and p.answer is not None]
        self.unedited = answer_predictions(model, tokenizer, [p.prompt for _, p in self.locality],
                                           [p.answer or "" for _, p in self.locality]) if self.locality else []

    def evaluate(self, router: Any, indices: Sequence[int]) -> dict[str, list[Any]]:
        position = {i: k for k, i in enumerate(indices)}
        per_edit: dict[str, list[list[float]]] = {key: [[] for _ in indices] for key in TEACHER_FORCED_KEYS}
        chosen = [(n, i, p) for n, (i, p) in enumerate(self.locality) if i in position]
        if chosen:
            edited = answer_predictions(self.model, self.tokenizer, [p.prompt for _, _, p in chosen],
                                        [p.answer or "" for _, _, p in chosen], router)
            for (n, i, probe), value in zip(chosen, agreement(edited, [self.unedited[n] for n, _, _ in chosen])):
                per_edit[f"loc_{probe.kind}"][position[i]].append(value)
        answered = [(i, p, self.records[i].target if p.kind == REPHRASE else p.answer) for i in indices
                    for p in self.records[i].all_probes() if (p.kind == REPHRASE or p.is_portability) and
                    (p.kind == REPHRASE or p.answer is not None)]
        if answered:
            accuracy = token_accuracy(self.model, self.tokenizer, [p.prompt for _, p, _ in answered],
                                      [a or "" for _, _, a in answered], router)
            for (i, probe, _), value in zip(answered, accuracy):
                keys = ["gen_all"] if probe.kind == REPHRASE else [f"port_{probe.kind}", "portability"]
                for key in keys:
                    per_edit[key][position[i]].append(value)
        return {key: [_mean_or_none(v) for v in values] for key, values in per_edit.items()}


# ----------------------------------------------------------------------------- CounterFact probability scores

PROBABILITY_KEYS = ("efficacy_score", "paraphrase_score", "neighbourhood_score")
_PROBABILITY_PROBES = {"efficacy_score": None, "paraphrase_score": REPHRASE, "neighbourhood_score": "neighbour"}


class ProbabilityScores:
    """CounterFact's scores as ROME, MEMIT and AlphaEdit report them, for records naming `target_true`:
    on the prompt (efficacy) and on each rephrase (paraphrase), 1 where the new target is likelier than
    the old fact; on each neighbour (neighbourhood), 1 where the old fact's neighbour answer stays
    likelier than the new target. "Likelier" compares the mean negative log-likelihood per answer
    token, as ROME's code does. Per edit over its probes, then over edits; the unedited model's scores
    are taken once, at construction."""

    def __init__(self, model: nn.Module, tokenizer: Any, records: Sequence[EditRecord]) -> None:
        self.model, self.tokenizer, self.records = model, tokenizer, list(records)
        self.unedited = self.evaluate(None, range(len(self.records)))

    def evaluate(self, router: Any, indices: Sequence[int]) -> dict[str, list[Any]]:
        indices = list(indices)
        pairs = []  # (position in indices, key, prompt)
        for k, i in enumerate(indices):
            record = self.records[i]
            if record.target_true is None:
                continue
            for key, kind in _PROBABILITY_PROBES.items():
                prompts = [record.prompt] if kind is None else [p.prompt for p in record.probes_of(kind)]
                pairs += [(k, key, prompt) for prompt in prompts]
        per_edit: dict[str, list[list[float]]] = {key: [[] for _ in indices] for key in PROBABILITY_KEYS}
        if pairs:
            new = [self.records[indices[k]].target for k, _, _ in pairs]
            true = [self.records[indices[k]].target_true or "" for k, _, _ in pairs]
            prompts = [prompt for _, _, prompt in pairs]
            nll = score_answers(self.model, self.tokenizer, prompts * 2, new + true, router).nll
            for (k, key, _), nll_new, nll_true in zip(pairs, nll[: len(pairs)], nll[len(pairs) :]):
                new_wins = float(nll_new.mean()) < float(nll_true.mean())
                per_edit[key][k].append(float(new_wins if key != "neighbourhood_score" else not new_wins))
        return {key: [_mean_or_none(v) for v in values] for key, values in per_edit.items()}

    def unedited_scores(self, indices: Sequence[int]) -> dict[str, float | None]:
        return {key: _mean_or_none([v for i in indices if (v := self.unedited[key][i]) is not None])
                for key in PROBABILITY_KEYS}
