"""PNG figures of a benchmark run (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(out: Path, summary: dict[str, Any], per_edit: Sequence[dict[str, Any]],
                 timeline: Sequence[dict[str, Any]]) -> list[Path]:
    paths = [plot_reliability_over_time(out / "reliability_over_time.png", summary, per_edit, timeline)]
    if summary.get("generative"):
        paths.append(plot_probe_families(out / "probe_families.png", summary))
    if summary.get("method", "lemoe") == "lemoe":  # expert routing plots: one expert per batch
        paths += [plot_routing_heatmap(out / "routing_heatmap.png", per_edit, int(summary["experts"])),
                  plot_expert_usage(out / "expert_usage.png", per_edit, int(summary["experts"]))]
    return paths


def plot_reliability_over_time(path: Path, summary: dict[str, Any], per_edit: Sequence[dict[str, Any]],
                               timeline: Sequence[dict[str, Any]]) -> Path:
    """Final Rel of each batch's edits by batch; immediate Rel; the forgetting curve if recorded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    by_batch: dict[int, list[float]] = defaultdict(list)
    for row in per_edit:
        by_batch[row["batch"]].append(row["rel"])
    edits_at = {row["batch"]: row["edits_so_far"] for row in timeline}
    xs = sorted(by_batch)
    ax.plot([edits_at[b] for b in xs], [sum(by_batch[b]) / len(by_batch[b]) for b in xs], "o-", ms=3,
            label="Rel of this batch's edits, final model (final)")
    if any("immediate_rel" in row for row in timeline):
        ax.plot([r["edits_so_far"] for r in timeline], [r["immediate_rel"] for r in timeline], "s--", ms=3,
                label="Rel right after its edit (immediate)")
    curve = [r for r in timeline if r.get("curve_rel") is not None]
    for key, style in (("rel", "-"), ("gen", ":"), ("loc", "-.")):
        points = [(r["edits_so_far"], r.get(f"curve_{key}")) for r in curve if r.get(f"curve_{key}") is not None]
        if points:
            ax.plot(*zip(*points), style, label=f"{key.capitalize()} of all edits so far (curve)")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("teacher-forced score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['method']} on {Path(str(summary['data'])).name}: T={summary['T']}, "
                 f"batch {summary['batch_size']}, {summary['order']} order")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_heatmap(path: Path, per_edit: Sequence[dict[str, Any]], experts: int) -> Path:
    """Rows: expert an edit was trained into; columns: expert its prompt (left) or its rephrase
    (right) routes to on the final model; the last column counts deferred inputs."""
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "routed_expert", "edit prompts"),
                           (axes[1], "rephrase_routed_expert", "rephrased prompts")):
        counts = np.zeros((max(experts, 1), max(experts, 1) + 1))
        for row in per_edit:
            if key == "rephrase_routed_expert" and row.get("gen") is None:
                continue  # no rephrase for this edit
            routed = row.get(key)
            counts[row["expert"], experts if routed is None else routed] += 1
        image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel(f"expert routed to (column {experts} = deferred)")
        ax.set_ylabel("expert trained on the edit")
        ax.set_title(f"routing of {title}, final model")
        fig.colorbar(image, ax=ax, label="edits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_usage(path: Path, per_edit: Sequence[dict[str, Any]], experts: int) -> Path:
    plt = _pyplot()
    usage = [0] * (experts + 1)
    for row in per_edit:
        routed = row["routed_expert"]
        usage[experts if routed is None else routed] += 1
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(experts), usage[:experts], color="tab:blue", label="routed to expert")
    ax.bar([experts], [usage[experts]], color="tab:gray", label="deferred")
    ax.set_xlabel("expert")
    ax.set_ylabel("edit prompts routed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_order_sensitivity(path: Path, values: dict[str, dict[str, Sequence[float]]]) -> Path:
    """Per metric, one violin for each multi-run order mode (e.g. five random orders) beside
    single runs (cluster order) as points. `values[metric][order label]` = one value per run."""
    plt = _pyplot()
    metrics = list(values)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        by_order = values[metric]
        labels = list(by_order)
        multi = [i for i, k in enumerate(labels) if len(by_order[k]) > 1]
        if multi:
            ax.violinplot([by_order[labels[i]] for i in multi], positions=[i + 1 for i in multi], showmeans=True)
        for i, key in enumerate(labels):
            ax.scatter([i + 1] * len(by_order[key]), by_order[key], color="black", s=10, zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_title(f"{metric} (final, teacher-forced)", fontsize=9)
    fig.suptitle("order sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forgetting_curves(path: Path, curves: dict[str, Sequence[dict[str, Any]]]) -> Path:
    """One panel per metric: each method's score on all edits so far against edits applied (curve protocol)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("rel", "gen", "loc"), ("Rel", "Gen", "Loc")):
        for method, points in curves.items():
            defined = [(p["edits"], p[key]) for p in points if p.get(key) is not None]
            if defined:
                ax.plot(*zip(*defined), "o-", ms=3, label=method)
        ax.set_title(f"{title} of all edits so far (curve, teacher-forced)", fontsize=9)
        ax.set_xlabel("edits applied")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# (label, summary section, key): higher is better for every family; leak is shown as "no leak"
PROBE_FAMILIES = (
    ("edited prompt", "generative", "rel_gen"),
    ("rephrase", "generative", "gen_gen"),
    ("chat question", "generative", "chat_gen"),
    ("chat answer ends", "generative", "chat_clean"),
    ("portability", "teacher_forced", "portability"),
    ("unrelated kept", "generative", "loc_gen_unrelated"),
    ("neighbours kept", "generative", "loc_gen_neighbour"),
    ("same subject kept", "generative", "loc_gen_same_subject"),
    ("distracting kept", "generative", "loc_gen_distracting"),
    ("no leak", "generative", "leak"),
)


def plot_probe_families(path: Path, summary: dict[str, Any]) -> Path:
    """One bar pair per probe family this run measured: the edited model beside the unedited one."""
    plt = _pyplot()
    unedited = summary.get("unedited") or {}
    labels, edited_values, unedited_values = [], [], []
    for label, section, key in PROBE_FAMILIES:
        value = (summary.get(section) or {}).get(key)
        if value is None:
            continue
        before = 1.0 if key.startswith("loc") else unedited.get(key)
        if key == "leak":
            value, before = 1 - value, None if before is None else 1 - before
        labels.append(label)
        edited_values.append(value)
        unedited_values.append(before if before is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], unedited_values, width=0.4, label="unedited model", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], edited_values, width=0.4, label="edited model", color="#1f77b4")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share (generative; portability teacher-forced)")
    ax.set_title(f"{summary.get('method', 'lemoe')}, T={summary.get('T')}: probe families (final)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
