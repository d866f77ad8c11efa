"""Greedy generation from an edited model is the same however it is run (issue 10).

    python benchmarks/generation_consistency.py --out results/generation_consistency.json

Edits the first T MEND ZsRE development records (batches of 10, stream order, default config),
then greedy-decodes every edited prompt, rephrase and unrelated locality prompt four ways: in
left-padded batches and one prompt at a time, each with and without the KV cache. Reports the share
of prompts whose four continuations are identical (must be 1.0), the prompts where they differ, and
generative exact match on the edited prompts (greedy decoding gives the target's tokens).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from common import header, write_json, zsre_records


def decode(model: Any, tok: Any, prompts: list[str], steps: int, batch_size: int, use_cache: bool) -> list[list[int]]:
    from lemoe.encoding import encode_prompts, pad_id

    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[start : start + batch_size], left_pad=True)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                   use_cache=use_cache, pad_token_id=pad_id(tok), eos_token_id=None)
        out.extend(generated[:, ids.shape[1]:].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10, help="edits per batch")
    parser.add_argument("--decode-batch", type=int, default=16, help="prompts per batched generate call")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LifelongEditor, load_model
    from lemoe.metrics import generative_exact_match, mean

    edits = zsre_records(0, args.T)
    model, tok = load_model()
    editor = LifelongEditor(model, tok)
    started = time.perf_counter()
    editor.edit_stream(edits, args.batch_size)
    edit_seconds = time.perf_counter() - started

    probes = {"edited": [e.prompt for e in edits], "rephrase": [e.rephrase for e in edits],
              "unrelated": [e.locality_prompt for e in edits]}
    by_kind: dict[str, Any] = {}
    for kind, prompts in probes.items():
        runs = {
            "batched_cached": decode(model, tok, prompts, args.new_tokens, args.decode_batch, True),
            "batched_uncached": decode(model, tok, prompts, args.new_tokens, args.decode_batch, False),
            "single_cached": decode(model, tok, prompts, args.new_tokens, 1, True),
            "single_uncached": decode(model, tok, prompts, args.new_tokens, 1, False),
        }
        reference = runs["single_cached"]
        same = [all(run[i] == reference[i] for run in runs.values()) for i in range(len(prompts))]
        by_kind[kind] = {
            "prompts": len(prompts),
            "all_four_identical": mean([float(s) for s in same]),
            "differing": [{"prompt": prompts[i], **{name: tok.decode(run[i]) for name, run in runs.items()}}
                          for i in range(len(prompts)) if not same[i]],
        }
    exact = generative_exact_match(model, tok, probes["edited"], [e.target for e in edits])
    result = {
        **header("generation_consistency", args),
        "data": "zsre_mend_dev.json",
        "T": len(edits),
        "batch_size": args.batch_size,
        "order": "stream",
        "protocol": "final",
        "new_tokens": args.new_tokens,
        "metric_protocol": {"all_four_identical": "generative (greedy; batched/single x cached/uncached)",
                            "exact_match_edited": "generative (greedy, target tokens exactly)"},
        "all_four_identical": {kind: value["all_four_identical"] for kind, value in by_kind.items()},
        "exact_match_edited": mean(exact),
        "seconds_per_edit": edit_seconds / len(edits),
        "by_kind": by_kind,
    }
    write_json(args.out, result)
    print(f"identical: {result['all_four_identical']}  exact match (edited prompts): {result['exact_match_edited']:.3f}")


if __name__ == "__main__":
    main()
