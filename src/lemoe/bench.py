"""Lifelong-editing protocols and their result directory.

Protocols (same definitions as WISE / LEMoE papers):
- `final`: apply all T edits, then evaluate every edit on the final model.
- `immediate`: evaluate each batch right after its edit (the final evaluation is recorded too,
  so the difference is what was forgotten).
- `curve`: every k batches, evaluate all edits so far (the forgetting curve); final recorded too.

Result directory: `edits.jsonl` (one line per edit), `summary.json`, `timeline.csv`, PNG plots.
"""

from __future__ import annotations

import csv
import json
import logging
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import LEMoEConfig
from .data import EditRecord
from .editor import EditReport, LifelongEditor
from .metrics import (agreement, answer_predictions, generative_exact_match, mean, score_answers,
                      target_perplexity, token_accuracy)
from .planning import ORDER_MODES, OrderPlan, plan_order
from .probe_metrics import (GENERATIVE_KEYS, PROBABILITY_KEYS, TEACHER_FORCED_KEYS, ProbabilityScores,
                           ProbeEvaluator, TeacherForcedProbes, macro_average)
from .probes import LOCALITY_KINDS, PORTABILITY_KINDS
from .provenance import git_commit, provenance

logger = logging.getLogger("lemoe")

PROTOCOLS = ("final", "immediate", "curve")
METRIC_PROTOCOL = {"rel": "teacher-forced", "gen": "teacher-forced", "loc": "teacher-forced",
                   "gen_em": "generative", "ppl": "teacher-forced", "routing_consistency": "final",
                   **{key: "generative (final)" for key in GENERATIVE_KEYS}, "leak_unedited": "generative",
                   **{key: "teacher-forced probability (final)" for key in PROBABILITY_KEYS},
                   **{key: "teacher-forced (final)" for key in TEACHER_FORCED_KEYS}}


@dataclass
class BenchSettings:
    """One benchmark run: which edits, in what order, evaluated how."""

    data: str
    T: int
    batch_size: int = 10
    order: str = "stream"
    protocol: str = "final"
    seed: int = 0
    curve_every: int = 1
    generative: bool = True
    model: str = "smollm2-135m"
    method: str = "lemoe"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.order not in ORDER_MODES:
            raise ValueError(f"order must be one of {ORDER_MODES}, got {self.order!r}")
        for name in ("T", "batch_size", "curve_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Evaluator:
    """Scores edits on the current model; the unedited model's locality answers are computed once."""

    def __init__(self, model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], generative: bool) -> None:
        self.model, self.tokenizer, self.records, self.generative = model, tokenizer, list(records), generative
        self.loc_index = [i for i, r in enumerate(self.records) if r.locality_prompt is not None]
        self.unedited_loc = dict(zip(self.loc_index, answer_predictions(
            model, tokenizer, [self.records[i].locality_prompt or "" for i in self.loc_index],
            [self.records[i].locality_answer or "" for i in self.loc_index])))
        self.ppl_before = target_perplexity(model, tokenizer, [r.prompt for r in self.records],
                                            [r.target for r in self.records])
        # every probe, by greedy decoding; the unedited model's outputs are taken now, before any edit
        self.probes = ProbeEvaluator(model, tokenizer, self.records) if generative else None
        self.teacher_forced_probes = TeacherForcedProbes(model, tokenizer, self.records)
        self.probability = ProbabilityScores(model, tokenizer, self.records)  # CounterFact's scores

    def evaluate(self, editor: Any, indices: Sequence[int], generative: bool | None = None) -> dict[str, list[Any]]:
        """Per edit (in `indices` order): rel, gen, loc, gen_em, ppl, routed expert. None where undefined.

        `editor` is a LifelongEditor or a baseline editor: scoring happens inside its `prompt_positions`.
        """
        model, tok, router = self.model, self.tokenizer, editor
        generative = self.generative if generative is None else generative
        chosen = [self.records[i] for i in indices]
        prompts, targets = [r.prompt for r in chosen], [r.target for r in chosen]
        edit_scores = score_answers(model, tok, prompts, targets, router)  # Rel and perplexity, one pass
        rel = edit_scores.accuracy()
        with_rephrase = [k for k, r in enumerate(chosen) if r.rephrase]
        gen_values = token_accuracy(model, tok, [chosen[k].rephrase or "" for k in with_rephrase],
                                    [targets[k] for k in with_rephrase], router) if with_rephrase else []
        with_loc = [k for k, i in enumerate(indices) if i in self.unedited_loc]
        loc_values = agreement(
            answer_predictions(model, tok, [chosen[k].locality_prompt or "" for k in with_loc],
                               [chosen[k].locality_answer or "" for k in with_loc], router),
            [self.unedited_loc[indices[k]] for k in with_loc]) if with_loc else []
        gen_em = generative_exact_match(model, tok, prompts, targets) if generative else [None] * len(chosen)
        return {
            "rel": rel,
            "gen": _scatter(len(chosen), with_rephrase, gen_values),
            "loc": _scatter(len(chosen), with_loc, loc_values),
            "gen_em": gen_em,
            "ppl": edit_scores.perplexity(),
            "routed": editor.route(prompts),
            "routed_rephrase": _scatter(len(chosen), with_rephrase,
                                        editor.route([chosen[k].rephrase or "" for k in with_rephrase])),
        }


def _scatter(n: int, positions: Sequence[int], values: Sequence[float]) -> list[float | None]:
    out: list[float | None] = [None] * n
    for k, v in zip(positions, values):
        out[k] = v
    return out


def _mean_defined(values: Sequence[Any]) -> float | None:
    defined = [v for v in values if v is not None]
    return mean(defined) if defined else None


def aggregate(scores: dict[str, list[Any]]) -> dict[str, float | None]:
    """Per metric, the mean over the edits where it is defined (None where it is nowhere)."""
    return {k: _mean_defined(scores[k]) for k in ("rel", "gen", "loc", "gen_em", "ppl")}


def run_bench(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    settings: BenchSettings,
    config: Any = None,
    out_dir: str | Path | None = None,
    on_batch: Callable[[EditReport], None] | None = None,
    evaluator: "Evaluator | None" = None,
) -> dict[str, Any]:
    """Run one protocol end to end with `settings.method` (LEMoE or a baseline, `config` of that method);
    returns summary.json's content and writes the result directory. `evaluator`: one built on the unedited
    model for these records (several methods share its unedited outputs instead of recomputing them)."""
    from .baselines import make_editor

    if settings.T > len(records):
        raise ValueError(f"T={settings.T} but the data holds only {len(records)} records")
    records = list(records[: settings.T])
    started_all = time.perf_counter()
    git_commit()  # the code this run starts with, whatever is committed while it runs
    plan_config = config if settings.method == "lemoe" else None
    plan = _plan(model, tokenizer, records, settings, plan_config)  # before any edit: one order for every method
    editor = make_editor(settings.method, model, tokenizer, config)
    try:
        return _run(editor, model, tokenizer, records, settings, plan, out_dir, on_batch, started_all, evaluator)
    finally:
        editor.unload()


def _plan(model: nn.Module, tokenizer: Any, records: list[EditRecord], settings: BenchSettings,
          config: LEMoEConfig | None) -> OrderPlan:
    """The batch order, planned in LEMoE's routing space on the unedited model, whatever the method."""
    planner = LifelongEditor(model, tokenizer, config or LEMoEConfig())
    try:
        vectors = planner.pooled_prompts([r.prompt for r in records])
    finally:
        planner.unload()
    return plan_order(vectors, settings.batch_size, settings.order, settings.seed)


def _run(editor: Any, model: nn.Module, tokenizer: Any, records: list[EditRecord], settings: BenchSettings,
         plan: OrderPlan, out_dir: str | Path | None, on_batch: Callable[[EditReport], None] | None,
         started_all: float, evaluator: Evaluator | None = None) -> dict[str, Any]:
    if evaluator is None or evaluator.records != records or evaluator.generative != settings.generative:
        evaluator = Evaluator(model, tokenizer, records, settings.generative)
    expert_of: dict[int, int] = {}
    batch_of: dict[int, int] = {}
    immediate: dict[int, dict[str, Any]] = {}
    timeline: list[dict[str, Any]] = []
    edit_seconds = 0.0
    done: list[int] = []
    for b, batch in enumerate(plan.batches):
        report = editor.edit([records[i] for i in batch])
        edit_seconds += report.seconds
        done.extend(batch)
        for i, stored in zip(batch, editor.edits[-len(batch):]):
            expert_of[i], batch_of[i] = stored["expert"], b
        row: dict[str, Any] = {"batch": b, "edits_so_far": len(done), "seconds": report.seconds,
                               "steps": report.steps, "expert": report.expert}
        if settings.protocol == "immediate":
            scores = evaluator.evaluate(editor, batch)
            for k, i in enumerate(batch):
                immediate[i] = {key: values[k] for key, values in scores.items()}
            row.update({f"immediate_{k}": v for k, v in aggregate(scores).items()})
        last = b == len(plan.batches) - 1  # its curve point is the final evaluation, taken once below
        if settings.protocol == "curve" and (b + 1) % settings.curve_every == 0 and not last:
            curve = aggregate(evaluator.evaluate(editor, done, generative=False))  # generation: final only
            row.update({f"curve_{k}": v for k, v in curve.items() if k != "gen_em"})
        timeline.append(row)
        if on_batch is not None:
            on_batch(report)
    order = plan.order
    final_scores = evaluator.evaluate(editor, order)
    final = aggregate(final_scores)
    tf_scores = evaluator.teacher_forced_probes.evaluate(editor, order)  # every probe, per kind
    probe_scores: dict[str, list[Any]] = {f"tf_{key}": values for key, values in tf_scores.items()}
    probability_scores = evaluator.probability.evaluate(editor, order)
    probe_scores.update(probability_scores)
    unedited = evaluator.probability.unedited_scores(order)
    generative: dict[str, float | None] | None = None
    if evaluator.probes is not None:  # every probe kind, by greedy decoding
        deferral = editor if isinstance(editor, LifelongEditor) else None  # deferred = unedited, exactly
        generative_scores = evaluator.probes.evaluate(order, exact_match=final_scores["gen_em"], router=deferral)
        probe_scores.update(generative_scores)
        generative = {**macro_average(generative_scores), "leak_unedited": evaluator.probes.leak_unedited_rate(order)}
        unedited.update(evaluator.probes.unedited_scores(order))
    if settings.protocol == "curve" and timeline:
        timeline[-1].update({f"curve_{k}": v for k, v in final.items() if k != "gen_em"})
    per_edit = []
    for k, i in enumerate(order):
        entry = {"index": i, "id": records[i].id, "prompt": records[i].prompt, "target": records[i].target,
                 "batch": batch_of[i], "expert": expert_of[i], "routed_expert": final_scores["routed"][k],
                 "rephrase_routed_expert": final_scores["routed_rephrase"][k],
                 **{key: final_scores[key][k] for key in ("rel", "gen", "loc", "gen_em", "ppl")},
                 **{key: values[k] for key, values in probe_scores.items()},
                 "ppl_before": evaluator.ppl_before[i]}
        if i in immediate:
            entry.update({f"immediate_{key}": v for key, v in immediate[i].items() if not key.startswith("routed")})
        per_edit.append(entry)
    immediate_scores = aggregate({key: [immediate[i][key] for i in order] for key in final}) if immediate else None
    headline = immediate_scores if immediate_scores is not None else final
    routes = getattr(editor, "has_routing", True)
    summary = {
        "method": settings.method,
        "model": settings.model,
        "data": settings.data,
        "T": len(records),
        "batch_size": settings.batch_size,
        "order": settings.order,
        "protocol": settings.protocol,
        **{k: headline[k] for k in ("rel", "gen", "loc", "gen_em")},
        "routing_consistency": editor.routing_consistency(),
        "routed_to_own_expert": mean([float(p["routed_expert"] == p["expert"]) for p in per_edit]) if routes else None,
        "rephrase_routed_to_own_expert": _mean_defined([float(p["rephrase_routed_expert"] == p["expert"])
                                                        for p in per_edit if records[p["index"]].rephrase])
        if routes else None,
        "seconds_per_edit": edit_seconds / len(records),
        "adapter_bytes": saved_size(editor),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seed": settings.seed,
        "final": final,
        "generative": generative,
        "teacher_forced": macro_average(tf_scores),
        "probability": macro_average(probability_scores),
        "unedited": unedited,
        "immediate": immediate_scores,
        "ppl_before": _mean_defined(evaluator.ppl_before),
        "ppl_after": final["ppl"],
        "metric_protocol": METRIC_PROTOCOL,
        "within_batch_similarity": plan.within_batch_similarity,
        "between_batch_similarity": plan.between_batch_similarity,
        "experts": editor.num_experts,
        "config": editor.config.to_dict(),
        "curve": [{"edits": row["edits_so_far"], **{k: row[f"curve_{k}"] for k in ("rel", "gen", "loc")}}
                  for row in timeline if "curve_rel" in row],
        "wall_seconds": time.perf_counter() - started_all,
        **provenance(),
    }
    if out_dir is not None:
        write_results(Path(out_dir), summary, per_edit, timeline, settings)
    return summary


def run_comparison(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    settings: BenchSettings,
    methods: Sequence[str],
    configs: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    on_batch: Callable[[EditReport], None] | None = None,
    curve_points: int = 5,
) -> dict[str, Any]:
    """Every method in turn on the same records, order and metrics; one `run_bench` per method.

    Scores are the final protocol; the forgetting curve (all edits so far, every T/`curve_points`
    edits) is recorded on the way. Writes `<method>/` result directories, `comparison.json`
    (one summary per method), `comparison.md` (the table) and `forgetting_curves.png`.
    """
    from .baselines import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if curve_points < 1:
        raise ValueError(f"curve_points must be >= 1, got {curve_points}")
    root = Path(out_dir) if out_dir is not None else None
    batches = -(-min(settings.T, len(records)) // settings.batch_size)
    every = max(1, batches // curve_points)
    summaries: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    # the unedited model's outputs, once for every method (each editor is unloaded after its run)
    shared = Evaluator(model, tokenizer, list(records[: settings.T]), settings.generative)
    for method in methods:
        run_settings = replace(settings, method=method, protocol="curve", curve_every=every)
        summaries[method] = run_bench(model, tokenizer, records, run_settings, (configs or {}).get(method),
                                      root / method if root is not None else None, on_batch, shared)
        result = comparison_result(summaries)
        if root is not None:  # after every method: an interrupted comparison keeps what it measured
            write_comparison(root, result)
    return result


def comparison_result(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """comparison.json's content from per-method summaries of one setting (data, T, batch size, order)."""
    first = next(iter(summaries.values()))
    for method, summary in summaries.items():
        for key in ("data", "T", "batch_size", "order"):
            if summary[key] != first[key]:
                raise ValueError(f"cannot compare {method}: its {key} is {summary[key]!r}, not {first[key]!r}")
    return {"benchmark": "comparison", "model": first["model"], "data": first["data"], "T": first["T"],
            "batch_size": first["batch_size"], "order": first["order"],
            "metric_protocol": "final (teacher-forced; gen_em generative); curves: curve protocol, teacher-forced",
            "methods": summaries, **provenance()}


def write_comparison(root: Path, result: dict[str, Any]) -> None:
    """comparison.json, comparison.md and forgetting_curves.png in `root`."""
    from .plots import plot_forgetting_curves

    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (root / "comparison.md").write_text(comparison_table(result))
    plot_forgetting_curves(root / "forgetting_curves.png", {m: s["curve"] for m, s in result["methods"].items()})


def comparison_rows(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row of COMPARISON_COLUMNS per method, final protocol."""
    rows = []
    for method, summary in result["methods"].items():
        final, generative = summary["final"], summary.get("generative") or {}
        parts = [final[k] for k in ("rel", "gen", "loc") if final[k] is not None]
        rows.append((method, final["rel"], final["gen"], final["loc"], sum(parts) / len(parts) if parts else None,
                     final["gen_em"], *(generative.get(k) for k in COMPARISON_GENERATIVE),
                     summary["seconds_per_edit"], summary["adapter_bytes"]))
    return rows


# The bench table's groups: did the edit take, does it generalise, is everything else kept, is the text fluent.
# Each entry: (summary section or None for the top level, key).
REPORT_GROUPS: tuple[tuple[str, tuple[tuple[str | None, str], ...]], ...] = (
    ("edit", ((None, "rel"), ("generative", "rel_gen"), ("probability", "efficacy_score"))),
    ("generalise", ((None, "gen"), ("teacher_forced", "gen_all"), ("generative", "gen_gen"),
                    ("generative", "chat_gen"), ("generative", "chat_clean"), ("probability", "paraphrase_score"),
                    *(("teacher_forced", f"port_{k}") for k in PORTABILITY_KINDS),
                    ("teacher_forced", "portability"))),
    ("keep", ((None, "loc"), *(("teacher_forced", f"loc_{k}") for k in LOCALITY_KINDS),
              *(("generative", f"loc_gen_{k}") for k in LOCALITY_KINDS),
              ("probability", "neighbourhood_score"), ("generative", "leak"))),
    ("fluency", (("generative", "fluency"),)),
)


def report_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, float, float | None]]:
    """The bench table: (group, metric, protocol, edited model, unedited model) for every metric this run
    measured. The unedited column holds what was measured before any edit; locality is 1 there by
    definition (it compares with the unedited model)."""
    unedited = summary.get("unedited") or {}
    rows = []
    for group, keys in REPORT_GROUPS:
        for section, key in keys:
            value = summary.get(key) if section is None else (summary.get(section) or {}).get(key)
            if value is None:
                continue
            before = 1.0 if key.startswith("loc") else unedited.get(key)
            rows.append((group, key, METRIC_PROTOCOL[key], value, before))
    return rows


COMPARISON_GENERATIVE = ("gen_gen", "chat_gen", "chat_clean", "loc_gen_unrelated", "loc_gen_neighbour",
                         "loc_gen_same_subject", "leak")
COMPARISON_COLUMNS = ("method", "Rel", "Gen", "Loc", "average", "exact match", *COMPARISON_GENERATIVE, "s/edit",
                      "adapter bytes")


def comparison_table(result: dict[str, Any]) -> str:
    """comparison.md: one row per method."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"# Comparison: {result['data']}, T={result['T']}, batch {result['batch_size']}, {result['order']} order",
             "", "Final protocol; Rel / Gen / Loc teacher-forced; exact match and the *_gen and leak columns "
             "generative (greedy; docs/results.md defines them).", "",
             "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in comparison_rows(result)]
    return "\n".join(lines) + "\n"


def run_order_sensitivity(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    settings: BenchSettings,
    random_orders: int,
    config: LEMoEConfig | None = None,
    out_dir: str | Path | None = None,
    on_batch: Callable[[EditReport], None] | None = None,
) -> dict[str, Any]:
    """The same edits in `random_orders` random orders (seeds seed..seed+N-1) and in cluster order.

    Each run is a full `run_bench` with its own result directory (`random_seed{S}/`, `cluster/`);
    `order_sensitivity.json` gathers their final scores and `order_sensitivity.png` draws them.
    """
    if random_orders < 1:
        raise ValueError(f"random_orders must be >= 1, got {random_orders}")
    root = Path(out_dir) if out_dir is not None else None
    runs: list[dict[str, Any]] = []
    plans = [("random", settings.seed + k) for k in range(random_orders)] + [("cluster", settings.seed)]
    for order, seed in plans:
        name = f"random_seed{seed}" if order == "random" else "cluster"
        run_settings = replace(settings, order=order, seed=seed)
        summary = run_bench(model, tokenizer, records, run_settings, config,
                            root / name if root is not None else None, on_batch)
        runs.append({"run": name, "order": order, "seed": seed, "protocol": settings.protocol,
                     **{k: summary["final"][k] for k in ("rel", "gen", "loc", "gen_em")},
                     "routing_consistency": summary["routing_consistency"],
                     "within_batch_similarity": summary["within_batch_similarity"],
                     "between_batch_similarity": summary["between_batch_similarity"],
                     "seconds_per_edit": summary["seconds_per_edit"]})
    spread: dict[str, dict[str, dict[str, float]]] = {}
    for order in ("random", "cluster"):
        chosen = [r for r in runs if r["order"] == order]
        spread[order] = {}
        for metric in ("rel", "gen", "loc", "gen_em"):
            values = [r[metric] for r in chosen if r[metric] is not None]
            if values:
                tensor = torch.tensor(values, dtype=torch.float64)
                spread[order][metric] = {"mean": float(tensor.mean()), "min": float(tensor.min()),
                                         "max": float(tensor.max()),
                                         "std": float(tensor.std()) if len(values) > 1 else 0.0}
    result = {"benchmark": "order_sensitivity", "method": settings.method, "model": settings.model,
              "data": settings.data, "T": min(settings.T, len(records)),
              "batch_size": settings.batch_size, "metric_protocol": "final (teacher-forced; gen_em generative)",
              "random_orders": random_orders, "runs": runs, "spread": spread, **provenance()}
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "order_sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
        from .plots import plot_order_sensitivity

        label = f"random ({random_orders})"
        plot_order_sensitivity(root / "order_sensitivity.png", {
            metric: {label: [r[metric] for r in runs if r["order"] == "random"],
                     "cluster": [r[metric] for r in runs if r["order"] == "cluster"]}
            for metric in ("rel", "gen", "loc")})
    return result


def saved_size(editor: Any) -> int:
    """Bytes of the editor's saved state on disk (its whole adapter directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        editor.save(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())


def write_results(out: Path, summary: dict[str, Any], per_edit: list[dict[str, Any]],
                  timeline: list[dict[str, Any]], settings: BenchSettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "edits.jsonl", "w", encoding="utf-8") as handle:
        for row in per_edit:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps({**summary, "settings": asdict(settings)}, indent=2) + "\n")
    columns: list[str] = []
    for row in timeline:
        columns.extend(k for k in row if k not in columns)
    with open(out / "timeline.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(timeline)
    from .plots import plot_results

    plot_results(out, summary, per_edit, timeline)
