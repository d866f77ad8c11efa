"""How well prompt embeddings separate rephrases (must route to their edit) from unrelated prompts
(must be deferred), per pooling and embedding space, with one anchor per edit: docs/routing.md.

    python benchmarks/routing_probe.py --out results/routing_probe.json [--quick]

No training: anchors are the edits' own prompts; the region threshold is the highest score any
built-in generic negative reaches plus the configured margin, as `KVAnchorRouter` fits it.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def fit_standardisation(prompts: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the router fits it: centre and scale from the first batch (10 prompts) and the negatives."""
    stats_from = torch.cat([prompts[:10], negatives])
    return stats_from.mean(0), stats_from.std(0).clamp(min=1e-4)


def standardised_units(prompts: torch.Tensor, negatives: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """[prompts, *others, negatives] standardised as the router does, then unit-normalised."""
    mu, sd = fit_standardisation(prompts, negatives)
    return [F.normalize((x - mu) / sd, dim=-1) for x in (prompts, *others, negatives)]


def separation(prompts: torch.Tensor, rephrases: torch.Tensor, unrelated: torch.Tensor, negatives: torch.Tensor,
               margin: float) -> dict[str, float]:
    """All inputs unit-normalised (n, d). Rephrase i should route to anchor i; unrelated must be deferred."""
    idx = torch.arange(prompts.shape[0])
    s_reph, s_unrel = rephrases @ prompts.T, unrelated @ prompts.T
    threshold = float((negatives @ prompts.T).max()) + margin

    def routed(t: float) -> float:
        return float(((s_reph.argmax(1) == idx) & (s_reph.max(1).values >= t)).float().mean())

    def deferred(t: float) -> float:
        return float((s_unrel.max(1).values < t).float().mean())

    sweep = max((routed(t) + deferred(t)) / 2 for t in torch.linspace(-1, 1, 201).tolist())
    return {"threshold": threshold, "rephrase_routed": routed(threshold), "unrelated_deferred": deferred(threshold),
            "best_average_over_thresholds": sweep}


def threshold_sweep(prompts: torch.Tensor, rephrases: torch.Tensor, unrelated: torch.Tensor,
                    negatives: torch.Tensor, batch: int, settings: list[tuple[float, float]]) -> list[dict]:
    """Per-expert regions (experts = consecutive batches of anchors), threshold = max(best generic
    negative + margin, floor): share of rephrases routed to their own expert and of unrelated
    prompts deferred. Unit-normalised inputs."""
    n = prompts.shape[0]
    owner = torch.arange(n) // batch
    experts = int(owner.max()) + 1
    negmax = torch.stack([(negatives @ prompts[owner == e].T).max() for e in range(experts)])

    def route(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        sims = x @ prompts.T
        scores = torch.full((x.shape[0], experts), -9.0).scatter_reduce(1, owner.expand(x.shape[0], -1), sims, "amax")
        scores = scores.masked_fill(scores < thresholds, -9.0)
        best, index = scores.max(dim=1)
        return torch.where(best > -9.0, index, torch.full_like(index, -1))

    rows = []
    for margin, floor in settings:
        thresholds = torch.clamp(negmax + margin, min=floor)
        rows.append({"edits": n, "margin": margin, "floor": floor,
                     "rephrase_routed": float((route(rephrases, thresholds) == owner).float().mean()),
                     "unrelated_deferred": float((route(unrelated, thresholds) == -1).float().mean())})
    return rows


def route_layer_sweep(model, tok, data: list[dict], demo: list[dict], layers: list[int], n: int) -> list[dict]:
    """Per route layer (the adaptor at layer 20): rephrases routed to their own expert and NQ
    locality deferred, with the default regions (margin 0.05, floor 0.5), at T=100 and T=n; and
    on the demo's near neighbours the best average over all thresholds."""
    from lemoe import LEMoEConfig, LifelongEditor
    from lemoe.editor import builtin_negatives

    config = LEMoEConfig()
    rows = []
    for layer in layers:
        editor = LifelongEditor(model, tok, LEMoEConfig(layer=20, route_layer=layer))
        negatives = editor.pooled_prompts(builtin_negatives())
        P, R, U = (editor.pooled_prompts([r[k] for r in data]) for k in ("src", "rephrase", "loc"))
        dP, dR, dU = (editor.pooled_prompts([r[k] for r in demo]) for k in ("prompt", "rephrase", "locality_prompt"))
        editor.unload()
        unit = standardised_units(P, negatives, R, U)
        for T in sorted({100, n}):
            row = threshold_sweep(unit[0][:T], unit[1][:T], unit[2][:T], unit[3], 10,
                                  [(config.route_margin, config.route_floor)])[0]
            rows.append({"route_layer": layer, "data": "zsre_mend_dev (NQ locality)", **row})
            print(f"route layer {layer:2d} T={T}: rephrase routed {row['rephrase_routed']:.3f}  "
                  f"unrelated deferred {row['unrelated_deferred']:.3f}", flush=True)
        demo_row = separation(*standardised_units(dP, negatives, dR, dU), margin=config.route_margin)
        rows.append({"route_layer": layer, "data": "demo (neighbour locality)", "edits": len(demo), **demo_row})
        print(f"route layer {layer:2d} demo: best average {demo_row['best_average_over_thresholds']:.2f}", flush=True)
    return rows


def same_subject_sweep(model, tok, n: int, layers: list[int], floors: list[float]) -> list[dict]:
    """KnowEdit ZsRE: the locality question asks about the edit's own subject. Per route layer and
    region floor, stream order, 10 anchors per expert: rephrases routed to their own expert and
    same-subject locality questions deferred."""
    from lemoe import LEMoEConfig, LifelongEditor
    from lemoe.data import read_edits
    from lemoe.editor import builtin_negatives

    records = read_edits(SHARED_DATA / "zsre" / "knowedit_zsre_test.json")[:n]
    margin = LEMoEConfig().route_margin
    rows = []
    for layer in layers:
        editor = LifelongEditor(model, tok, LEMoEConfig(layer=20, route_layer=layer))
        negatives = editor.pooled_prompts(builtin_negatives())
        P, R, U = (editor.pooled_prompts([getattr(r, k) for r in records])
                   for k in ("prompt", "rephrase", "locality_prompt"))
        editor.unload()
        unit = standardised_units(P, negatives, R, U)
        for row in threshold_sweep(*unit, 10, [(margin, floor) for floor in floors]):
            rows.append({"route_layer": layer, "data": "knowedit_zsre_test (same-subject locality)", **row})
            print(f"KnowEdit route layer {layer:2d} floor {row['floor']:.1f}: rephrase routed "
                  f"{row['rephrase_routed']:.3f}  same-subject locality deferred {row['unrelated_deferred']:.3f}",
                  flush=True)
    return rows


SWEEP = [(0.05, -1.0), (0.1, -1.0), (0.15, -1.0), (0.2, -1.0), (0.1, 0.45), (0.05, 0.5), (0.15, 0.5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="100 ZsRE edits instead of 300")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[20, 12])
    parser.add_argument("--route-layers", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 9, 12, 15, 20])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LEMoEConfig, LifelongEditor, load_model
    from lemoe.editor import builtin_negatives

    model, tok = load_model()
    n = 100 if args.quick else 300
    zsre = json.loads((SHARED_DATA / "zsre" / "zsre_mend_dev.json").read_text())[:n]
    demo = json.loads(resources.files("lemoe").joinpath("resources/demo_edits.json").read_text())
    sets = {
        "zsre_mend_dev (NQ locality)": ([r["src"] for r in zsre], [r["rephrase"] for r in zsre], [r["loc"] for r in zsre]),
        "demo (neighbour locality)": ([r["prompt"] for r in demo], [r["rephrase"] for r in demo],
                                      [r["locality_prompt"] for r in demo]),
    }
    margin = LEMoEConfig().route_margin
    rows = []
    for layer in args.layers:
        for pooling in ("mean", "last"):
            editor = LifelongEditor(model, tok, LEMoEConfig(layer=layer, route_layer=layer, pooling=pooling))
            negatives = editor.pooled_prompts(builtin_negatives())
            for name, (p, r, u) in sets.items():
                P, R, U = (editor.pooled_prompts(x) for x in (p, r, u))
                mu, sd = fit_standardisation(P, negatives)
                spaces = {"raw": lambda x: x, "centred": lambda x, mu=mu: x - mu,
                          "standardised": lambda x, mu=mu, sd=sd: (x - mu) / sd}
                for space, f in spaces.items():
                    unit = [F.normalize(f(x), dim=-1) for x in (P, R, U, negatives)]
                    row = {"layer": layer, "pooling": pooling, "space": space, "data": name, "edits": len(p),
                           **separation(*unit, margin=margin)}
                    rows.append(row)
                    print(f"L{layer} {pooling:4s} {space:12s} {name:28s} rephrase routed {row['rephrase_routed']:.2f}"
                          f"  unrelated deferred {row['unrelated_deferred']:.2f}"
                          f"  best avg {row['best_average_over_thresholds']:.2f}", flush=True)
            editor.unload()
    # region thresholds, routing from the edited layer (20), stream order, batches of 10
    n_sweep = 100 if args.quick else 1000
    sweep_data = json.loads((SHARED_DATA / "zsre" / "zsre_mend_dev.json").read_text())[:n_sweep]
    editor = LifelongEditor(model, tok, LEMoEConfig(layer=20, route_layer=20))
    negatives = editor.pooled_prompts(builtin_negatives())
    P, R, U = (editor.pooled_prompts([r[k] for r in sweep_data]) for k in ("src", "rephrase", "loc"))
    editor.unload()
    unit = standardised_units(P, negatives, R, U)
    sweep = []
    for T in sorted({100, n_sweep}):
        for row in threshold_sweep(unit[0][:T], unit[1][:T], unit[2][:T], unit[3], 10, SWEEP):
            sweep.append(row)
            print(f"T={T} margin {row['margin']:.2f} floor {row['floor']:+.2f}: rephrase routed "
                  f"{row['rephrase_routed']:.3f}  unrelated deferred {row['unrelated_deferred']:.3f}", flush=True)
    layer_rows = route_layer_sweep(model, tok, sweep_data, demo, args.route_layers, n_sweep)
    same_subject = same_subject_sweep(model, tok, n_sweep, [5, 12, 20], [0.5, 0.7, 0.8])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "routing_probe", "threads": args.threads, "margin": margin,
                                          "rows": rows, "threshold_sweep": sweep, "route_layer_sweep": layer_rows,
                                          "same_subject_sweep": same_subject},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
