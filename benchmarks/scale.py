"""A long edit stream at constant cost: T=3000 ZsRE-style edits in batches of 10 on the default model.

    python benchmarks/scale.py --out results/scale.json [--quick] [--T 3000]

The MEND-format development file holds 2,000 records, so edits 2,000..2,999 are the first KnowEdit
ZsRE test records (the same kind of question, prompt -> new target with a rephrase) whose prompt is
not among the first 2,000, each given an unrelated NQ locality question from the MEND file (record
i mod 2,000), so that every edit's locality question is of the same kind. Stream order.
Protocol `curve`: every 500 edits, Rel / Gen / Loc of all edits so far; `final` at the end (all
teacher-forced). Seconds per batch are recorded for every batch (timeline). The full result
directory (edits.jsonl, timeline.csv, plots) goes next to the JSON.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from common import SHARED_DATA, header, table, write_json, zsre_records


def scale_records(T: int) -> list:
    from lemoe.data import read_edits

    mend = zsre_records(0, 2000)
    if T <= len(mend):
        return mend[:T]
    seen = {r.prompt for r in mend}
    extra = [r for r in read_edits(SHARED_DATA / "zsre" / "knowedit_zsre_test.json") if r.prompt not in seen]
    need = T - len(mend)
    if need > len(extra):
        raise SystemExit(f"only {len(mend) + len(extra)} distinct ZsRE records available, asked for T={T}")
    combined = list(mend)
    for k, record in enumerate(extra[:need]):
        nq = mend[(len(mend) + k) % len(mend)]
        combined.append(replace(record, locality_prompt=nq.locality_prompt, locality_answer=nq.locality_answer))
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result; the result directory goes beside it")
    parser.add_argument("--quick", action="store_true", help="T=300, curve every 100 edits (under 5 minutes)")
    parser.add_argument("--T", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--every", type=int, default=None, help="edits between curve evaluations")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import load_model
    from lemoe.bench import BenchSettings, run_bench

    T = args.T or (300 if args.quick else 3000)
    every = args.every or (100 if args.quick else 500)
    records = scale_records(T)
    model, tok = load_model(device=args.device)
    settings = BenchSettings(data="zsre_mend_dev.json + knowedit_zsre_test.json (see scale.py)", T=T,
                             batch_size=args.batch_size, order="stream", protocol="curve",
                             curve_every=max(1, every // args.batch_size), generative=False)
    out_dir = Path(args.out).with_suffix("")
    done = [0]

    def progress(report) -> None:
        done[0] += report.num_edits
        if done[0] % every == 0 or done[0] == T:
            print(f"{done[0]}/{T} edits, last batch {report.seconds:.2f} s", flush=True)

    summary = run_bench(model, tok, records, settings, out_dir=out_dir, on_batch=progress)
    timeline = list(csv.DictReader(open(out_dir / "timeline.csv")))
    seconds = [float(r["seconds"]) for r in timeline]
    tenth = max(1, len(seconds) // 10)
    first, last = sum(seconds[:tenth]), sum(seconds[-tenth:])
    checkpoints = [{"edits": int(r["edits_so_far"]), **{k: float(r[f"curve_{k}"]) for k in ("rel", "gen", "loc")}}
                   for r in timeline if r.get("curve_rel")]
    result = {**header("scale", args, args.device), "data": settings.data, "T": T, "batch_size": args.batch_size,
              "order": "stream", "protocol": "final (headline) and curve (checkpoints), teacher-forced",
              "rel": summary["final"]["rel"], "gen": summary["final"]["gen"], "loc": summary["final"]["loc"],
              "routing_consistency": summary["routing_consistency"],
              "seconds_per_edit": summary["seconds_per_edit"],
              "edit_seconds_total": sum(seconds), "wall_seconds": summary["wall_seconds"],
              "seconds_per_edit_first_10pct": first / (tenth * args.batch_size),
              "seconds_per_edit_last_10pct": last / (tenth * args.batch_size),
              "last_over_first_10pct": last / first, "median_batch_seconds": statistics.median(seconds),
              "checkpoints": checkpoints, "batch_seconds": seconds, "peak_rss_mb": summary["peak_rss_mb"],
              "result_directory": str(out_dir),
              "targets": {"wall_seconds": 3600, "last_over_first_10pct": 1.2, "rel": 0.9, "gen": 0.75, "loc": 0.99}}
    write_json(args.out, result)
    print(table([(c["edits"], c["rel"], c["gen"], c["loc"]) for c in checkpoints],
                ["edits so far", "Rel (curve)", "Gen (curve)", "Loc (curve)"]))
    print(f"final: Rel {result['rel']:.3f} Gen {result['gen']:.3f} Loc {result['loc']:.3f}; "
          f"{result['seconds_per_edit']:.3f} s/edit; last/first 10% {result['last_over_first_10pct']:.2f}; "
          f"wall {result['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
