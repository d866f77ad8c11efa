"""Generation latency of the edited model with 0, 10, 100, 1,000 experts against the unedited
model, and the cost of routing itself with up to 100,000 experts.

    python benchmarks/inference_overhead.py --out results/inference_overhead.json [--quick] [--device cuda]

Generation: greedy, batch 1, N prompts x 20 new tokens, best of R repeats per prompt. Half the
prompts are edited ZsRE questions (routed to an expert), half unrelated NQ questions (deferred).
"Unedited" is the same model with the adaptor disabled (the base FFN alone), timed interleaved
with the edited one so that drift in machine speed hits both alike. Experts are synthetic: random
non-zero LoRA weights, anchors from real ZsRE prompts (10 per expert), which costs exactly what
trained experts cost at inference.

Routing at scale: a KVAnchorRouter with E experts x 10 synthetic unit anchors (d = 576); time of
one routing decision (one matrix product, a max per expert, thresholds, top-k) for 1 and 32
sequences, and the anchor memory.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import add_synthetic_experts, greedy, header, table, timed, write_json, zsre_records


def generation_latency(model, tok, editor, prompts, new_tokens, repeats, device) -> tuple[float, float]:
    """(unedited, edited) total seconds over prompts, best of `repeats` each, interleaved."""
    unedited = edited = 0.0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").to(device)
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):
            for enabled in (False, True):
                run = lambda ids=ids: greedy(model, tok, ids, new_tokens)  # noqa: E731
                if enabled:
                    seconds = timed(run, device)
                else:
                    with editor.disabled():
                        seconds = timed(run, device)
                best[enabled] = min(best[enabled], seconds)
        unedited += best[False]
        edited += best[True]
    return unedited, edited


def routing_scale(counts: list[int], anchors_per_expert: int, hidden: int, device: str) -> list[dict]:
    from lemoe import LEMoEConfig
    from lemoe.router import KVAnchorRouter

    rows = []
    generator = torch.Generator().manual_seed(0)
    for experts in counts:
        router = KVAnchorRouter(hidden, LEMoEConfig())
        total = experts * anchors_per_expert
        router.anchors = F.normalize(torch.randn(total, hidden, generator=generator), dim=-1).to(device)
        router.anchor_experts = torch.arange(experts).repeat_interleave(anchors_per_expert).to(device)
        router.thresholds = torch.full((experts,), 0.5, device=device)
        router.to(device)
        row = {"experts": experts, "anchors": total,
               "anchor_bytes": router.anchors.numel() * router.anchors.element_size(),
               "anchor_bytes_with_pooled_copies": 2 * router.anchors.numel() * router.anchors.element_size()}
        for batch in (1, 32):
            values = F.normalize(torch.randn(batch, hidden, generator=generator), dim=-1).to(device)
            router.route_values(values, 1, True)  # warm-up
            decide = lambda r=router, v=values: r.route_values(v, 1, True)  # noqa: E731
            times = [timed(decide, device) for _ in range(20)]
            row[f"route_ms_batch_{batch}"] = 1000 * statistics.median(times)
        rows.append(row)
        print(f"routing, {experts} experts ({total} anchors): {row['route_ms_batch_1']:.3f} ms for 1 sequence, "
              f"{row['route_ms_batch_32']:.3f} ms for 32", flush=True)
        del router
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="10 prompts, 2 repeats, routing up to 10,000 experts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="local HF model directory (default: the built-in model)")
    parser.add_argument("--experts", type=int, nargs="+", default=[0, 10, 100, 1000])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--routing-max", type=int, default=None,
                        help="largest expert count of the routing table (default 100,000; 10,000 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LifelongEditor, load_model

    model, tok = load_model(args.model, device=args.device)
    prompts_each, repeats = (5, 2) if args.quick else (10, 3)
    pool = zsre_records(0, 2000)
    anchor_prompts = [r.prompt for r in pool] * (1 + max(args.experts) * 10 // len(pool))
    edited = [r.prompt for r in pool[:prompts_each]]
    unrelated = [r.locality_prompt for r in pool[:prompts_each]]
    editor = LifelongEditor(model, tok)
    rows = []
    for count in sorted(args.experts):
        add_synthetic_experts(editor, anchor_prompts[editor.num_experts * 10 :], count - editor.num_experts)
        base_e, edit_e = generation_latency(model, tok, editor, edited, args.new_tokens, repeats, args.device)
        base_u, edit_u = generation_latency(model, tok, editor, unrelated, args.new_tokens, repeats, args.device)
        routes = editor.route(edited + unrelated)
        tokens = args.new_tokens * (len(edited) + len(unrelated))
        row = {"experts": count, "latency_ratio": (edit_e + edit_u) / (base_e + base_u),
               "latency_ratio_edited_prompts": edit_e / base_e, "latency_ratio_unrelated_prompts": edit_u / base_u,
               "tokens_per_second_unedited": tokens / (base_e + base_u),
               "tokens_per_second_edited": tokens / (edit_e + edit_u),
               "edited_prompts_routed": sum(r is not None for r in routes[: len(edited)]) / len(edited),
               "unrelated_prompts_deferred": sum(r is None for r in routes[len(edited):]) / len(unrelated)}
        rows.append(row)
        print(f"{count} experts: latency ratio {row['latency_ratio']:.3f} (edited prompts "
              f"{row['latency_ratio_edited_prompts']:.3f}, unrelated {row['latency_ratio_unrelated_prompts']:.3f}), "
              f"{row['tokens_per_second_edited']:.1f} tokens/s", flush=True)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    editor.unload()
    routing_max = args.routing_max or (10_000 if args.quick else 100_000)
    scale_counts = [c for c in (10, 100, 1000, 10_000, 100_000) if c <= routing_max]
    routing = routing_scale(scale_counts, 10, hidden, args.device)
    result = {**header("inference_overhead", args, args.device),
              "generation": {"prompts": 2 * prompts_each, "new_tokens": args.new_tokens, "repeats": repeats,
                             "batch_size": 1, "expert_kind": "lora", "experts_are": "synthetic (random weights, "
                             "real-prompt anchors, 10 per expert)",
                             "unedited": "adaptor disabled (base FFN only), timed interleaved"},
              "experts": [r["experts"] for r in rows], "latency_ratio": [r["latency_ratio"] for r in rows],
              "rows": rows, "routing_scale": routing,
              "targets": {"latency_ratio_at_1000_experts": 1.03}}
    write_json(args.out, result)
    print(table([(r["experts"], r["latency_ratio"], r["tokens_per_second_unedited"], r["tokens_per_second_edited"],
                  r["edited_prompts_routed"], r["unrelated_prompts_deferred"]) for r in rows],
                ["experts", "latency ratio", "tok/s unedited", "tok/s edited", "edited routed", "unrelated deferred"]))
    print(table([(r["experts"], r["anchors"], r["route_ms_batch_1"], r["route_ms_batch_32"], r["anchor_bytes"])
                 for r in routing], ["experts", "anchors", "route ms (1 seq)", "route ms (32 seq)", "anchor bytes"]))


if __name__ == "__main__":
    main()
