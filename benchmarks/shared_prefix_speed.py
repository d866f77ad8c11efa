"""What running a shared prompt beginning once saves while an expert trains (lemoe.shared_prefix).

    python benchmarks/shared_prefix_speed.py --edits 50 --out results/shared_prefix_speed.json

The same records (MEND ZsRE development file, stream order, batches of 10, the default config, so
with chat rows) are edited twice on fresh copies of the model: with the chat rows' shared beginning
run once, and with every token run (sharing switched off). Reported: seconds per edit, steps, seconds
per step, the tokens one step runs, and how far the two runs' experts differ (they should not,
beyond float rounding: the largest absolute difference of any expert weight, and whether every batch
took the same number of steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import header, synchronize, table, write_json, zsre_records


def tokens_per_step(batch, shared: bool) -> int:
    """Tokens one training step runs through layers L..N, per part as `optimise` splits the batch."""
    from lemoe.encoding import length_groups
    from lemoe.shared_prefix import MIN_SHARED_TOKENS, shared_prefix_length

    total = 0
    for rows in length_groups(batch.attention_mask.sum(dim=1).tolist()):
        part, _ = batch.select(rows)
        tokens = int(part.attention_mask.numel())  # padded width x rows: what the forward runs
        common = shared_prefix_length(part) if shared else 0
        if common >= MIN_SHARED_TOKENS:
            tokens -= common * (part.size - 1)
        total += tokens
    return total


def run(model_name, device, records, batch_size, shared: bool) -> dict:
    from lemoe import LEMoEConfig, LifelongEditor, load_model, shared_prefix
    from lemoe.editor import encode_edits

    model, tok = load_model(model_name, device=device)
    if not shared:
        shared_prefix._VERIFIED[model] = False  # the switch the first-run check uses: every token runs
    editor = LifelongEditor(model, tok, LEMoEConfig())
    editor._negative_queries()  # one-time setup, not an edit's cost
    seconds, steps, tokens = 0.0, [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = encode_edits(tok, model, chunk, start, chat=editor.config.chat_rows)
        tokens.append((tokens_per_step(batch, True), tokens_per_step(batch, False)))
        synchronize(device)
        began = time.perf_counter()
        report = editor.edit(chunk)
        synchronize(device)
        seconds += time.perf_counter() - began
        steps.append(report.steps)
    weights = [p.detach().cpu().clone() for expert in editor.adaptor.experts for p in expert.parameters()]
    used = shared and shared_prefix._VERIFIED.get(model) is True  # the runtime check passed: sharing ran
    counted = [with_sharing if used else without for with_sharing, without in tokens]
    return {"shared": shared, "sharing_used": used, "edits": len(records),
            "seconds_per_edit": seconds / len(records), "steps": steps,
            "seconds_per_step": seconds / max(1, sum(steps)), "mean_tokens_per_step": sum(counted) / len(counted),
            "_weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="built-in name or local HF model directory (default: SmolLM2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = zsre_records(0, args.edits)
    rows = [run(args.model, args.device, records, args.batch_size, shared) for shared in (True, False)]
    on, off = rows
    difference = max(float((a - b).abs().max()) for a, b in zip(on.pop("_weights"), off.pop("_weights")))
    result = {**header("shared_prefix_speed", args, args.device), "model_name": args.model or "smollm2-135m",
              "data": "zsre_mend_dev.json (first edits, stream order), default config (chat rows)",
              "runs": rows, "speedup": off["seconds_per_edit"] / on["seconds_per_edit"],
              "same_steps": on["steps"] == off["steps"], "largest_expert_weight_difference": difference}
    write_json(args.out, result)
    print(table([("shared" if r["shared"] else "every token", r["seconds_per_edit"], sum(r["steps"]) / len(r["steps"]),
                  r["seconds_per_step"], r["mean_tokens_per_step"]) for r in rows],
                ["training", "s/edit", "steps/batch", "s/step", "tokens/step"]))
    print(f"speedup {result['speedup']:.2f}x, same steps: {result['same_steps']}, "
          f"largest expert weight difference {difference:.2e}")


if __name__ == "__main__":
    main()
