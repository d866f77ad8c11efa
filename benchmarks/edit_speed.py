"""Seconds per edit against its floor, per expert kind, with the quality each kind reaches.

    python benchmarks/edit_speed.py --out results/edit_speed.json [--quick] [--device cuda]

The floor of one batch is (training steps it took) x (one forward and backward pass of layers
L..N over the batch, logits at target positions only), the pass timed separately (best of 3) on
the same batch. The ratio seconds / floor is what `edit` spends above that: the frozen capture
pass, the check forward after the last step, routing, Python. Each kind edits the same ZsRE
records (stream order, batches of 10) and is then scored on them (final protocol, teacher-forced).
The one-time embedding of the built-in negatives (first edit only) is timed apart.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import header, synchronize, table, timed, write_json, zsre_records

KINDS = {
    "lora-r64 (default)": {"expert": "lora", "lora_rank": 64},
    "lora-r16": {"expert": "lora", "lora_rank": 16},
    "lora-r4": {"expert": "lora", "lora_rank": 4},
    "ffn": {"expert": "ffn"},
}


def pass_seconds(editor, records) -> float:
    """Best of 3: forward of layers L..N (replayed input) + backward into the newest expert."""
    from lemoe.encoding import answer_logits, encode_pairs
    from lemoe.training import capture_layer_inputs, replay_below

    batch = encode_pairs(editor.tokenizer, [r.prompt for r in records], [r.target for r in records]).to(
        editor.input_device)
    layer_input, _ = capture_layer_inputs(editor.model, editor.layers, editor.layer_idx, editor.adaptor,
                                          editor.route_ffn, batch)
    expert_id = editor.num_experts - 1
    params = list(editor.adaptor.experts[expert_id].parameters())
    for p in params:
        p.requires_grad_(True)
    forced = torch.full((batch.size,), expert_id, dtype=torch.long)
    best = float("inf")
    try:
        with replay_below(editor.layers, editor.layer_idx, layer_input), editor.adaptor.forced_route(forced):
            for _ in range(3):
                def step() -> None:
                    logits = answer_logits(editor.model, batch)
                    loss = F.cross_entropy(logits, batch.targets.to(logits.device))
                    torch.autograd.grad(loss, params)
                best = min(best, timed(step, editor.device))
    finally:
        for p in params:
            p.requires_grad_(False)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="30 edits per kind instead of 200 (under 5 minutes)")
    parser.add_argument("--edits", type=int, default=None, help="edits per kind (overrides --quick)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="local HF model directory (default: the built-in model)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LEMoEConfig, LifelongEditor, load_model
    from lemoe.bench import Evaluator

    model, tok = load_model(args.model, device=args.device)
    n = args.edits or (30 if args.quick else 200)
    records = zsre_records(0, n)
    evaluator = Evaluator(model, tok, records, generative=False)
    rows = []
    for name in args.kinds:
        config = LEMoEConfig(**KINDS[name])
        editor = LifelongEditor(model, tok, config)
        setup = timed(editor._negative_vectors, args.device)
        seconds = floor = 0.0
        steps = []
        for start in range(0, n, args.batch_size):
            chunk = records[start : start + args.batch_size]
            synchronize(args.device)
            began = time.perf_counter()
            report = editor.edit(chunk)
            synchronize(args.device)
            seconds += time.perf_counter() - began
            steps.append(report.steps)
            floor += report.steps * pass_seconds(editor, chunk)
        scores = evaluator.evaluate(editor, list(range(n)))
        expert_bytes = sum(p.numel() * p.element_size() for p in editor.adaptor.experts[0].parameters())
        row = {"kind": name, "expert_kind": config.expert, "lora_rank": config.lora_rank if config.expert == "lora"
               else None, "edits": n, "batch_size": args.batch_size,
               "seconds_per_edit": seconds / n, "floor_seconds_per_edit": floor / n, "ratio_to_floor": seconds / floor,
               "mean_steps_per_batch": sum(steps) / len(steps), "one_time_setup_seconds": setup,
               "expert_parameter_bytes": expert_bytes,
               **{k: sum(v) / len(v) for k in ("rel", "gen", "loc") for v in [[x for x in scores[k] if x is not None]]}}
        rows.append(row)
        print(f"{name}: {row['seconds_per_edit']:.3f} s/edit, floor {row['floor_seconds_per_edit']:.3f}, "
              f"ratio {row['ratio_to_floor']:.2f}, steps {row['mean_steps_per_batch']:.1f}, Rel {row['rel']:.3f} "
              f"Gen {row['gen']:.3f} Loc {row['loc']:.3f}", flush=True)
        editor.unload()
    default = next(r for r in rows if r["kind"].endswith("(default)")) if any(
        r["kind"].endswith("(default)") for r in rows) else rows[0]
    result = {**header("edit_speed", args, args.device), "data": "zsre_mend_dev.json (first edits, stream order)",
              "protocol": "final, teacher-forced", "seconds_per_edit": default["seconds_per_edit"],
              "floor_seconds_per_edit": default["floor_seconds_per_edit"], "expert_kind": default["expert_kind"],
              "ratio_to_floor": default["ratio_to_floor"], "kinds": rows,
              "targets": {"ratio_to_floor": 2.0, "seconds_per_edit_batch_10": 0.5}}
    write_json(args.out, result)
    print(table([(r["kind"], r["seconds_per_edit"], r["floor_seconds_per_edit"], r["ratio_to_floor"],
                  r["mean_steps_per_batch"], r["rel"], r["gen"], r["loc"], r["expert_parameter_bytes"])
                 for r in rows], ["kind", "s/edit", "floor s/edit", "ratio", "steps", "Rel", "Gen", "Loc",
                                  "bytes/expert"]))


if __name__ == "__main__":
    main()
