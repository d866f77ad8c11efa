"""Edit quality on the default model, final protocol: apply T ZsRE edits in batches, then evaluate
every edit on the final model (Rel / Gen / Loc teacher-forced, generative exact match, routing).

    python benchmarks/edit_quality.py --T 100 --batch-size 10 --out results/edit_quality_T100.json

Stream order (the file's order). Data: MEND-format ZsRE development records (NQ locality questions).
The full harness with orders, protocols and plots is `lemoe bench` (issue 3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--T", type=int, default=100, help="number of edits")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(SHARED_DATA / "zsre" / "zsre_mend_dev.json"))
    parser.add_argument("--config", default="{}", help="JSON overrides of LEMoEConfig")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import EditRecord, LEMoEConfig, LifelongEditor, load_model
    from lemoe.provenance import provenance
    from lemoe.metrics import agreement, answer_predictions, generative_exact_match, mean, token_accuracy

    rows = json.loads(Path(args.data).read_text())[: args.T]
    edits = [EditRecord(prompt=r["src"], target=r["alt"], rephrase=r["rephrase"], locality_prompt=r["loc"],
                        locality_answer=r["loc_ans"]) for r in rows]
    model, tok = load_model()
    loc_p, loc_a = [e.locality_prompt for e in edits], [e.locality_answer for e in edits]
    unedited_loc = answer_predictions(model, tok, loc_p, loc_a)
    config = LEMoEConfig.from_dict(json.loads(args.config))
    editor = LifelongEditor(model, tok, config)
    started = time.perf_counter()
    reports = editor.edit_stream(edits, args.batch_size)
    seconds = time.perf_counter() - started
    targets = [e.target for e in edits]
    rel = token_accuracy(model, tok, [e.prompt for e in edits], targets, editor.adaptor)
    gen = token_accuracy(model, tok, [e.rephrase for e in edits], targets, editor.adaptor)
    loc = agreement(answer_predictions(model, tok, loc_p, loc_a, editor.adaptor), unedited_loc)
    em = generative_exact_match(model, tok, [e.prompt for e in edits], targets)
    routes = editor.route([e.locality_prompt for e in edits])
    result = {
        "benchmark": "edit_quality",
        "method": "lemoe",
        "model": "smollm2-135m",
        "data": Path(args.data).name,
        "T": len(edits),
        "batch_size": args.batch_size,
        "order": "stream",
        "protocol": "final",
        "config": editor.config.to_dict(),
        "rel": mean(rel),
        "gen": mean(gen),
        "loc": mean(loc),
        "metric_protocol": {"rel": "teacher-forced", "gen": "teacher-forced", "loc": "teacher-forced",
                            "gen_em": "generative"},
        "gen_em": mean(em),
        "routing_consistency": editor.routing_consistency(),
        "locality_prompts_deferred": sum(r is None for r in routes) / len(routes),
        "seconds_per_edit": seconds / len(edits),
        "steps_per_batch": [r.steps for r in reports],
        **provenance(),
        "command": f"python benchmarks/edit_quality.py --T {args.T} --batch-size {args.batch_size} --out {args.out}"
                   + (f" --config '{args.config}'" if json.loads(args.config) else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"T={result['T']} batch {args.batch_size}, final protocol: Rel {result['rel']:.3f}  Gen {result['gen']:.3f}  "
          f"Loc {result['loc']:.3f} (teacher-forced)  EM {result['gen_em']:.3f} (generative)  "
          f"routing consistency {result['routing_consistency']:.3f}  {result['seconds_per_edit']:.2f} s/edit")


if __name__ == "__main__":
    main()
