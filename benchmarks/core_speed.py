"""Core speed on the default model: seconds per edit (batches of 10 ZsRE edits) and the
greedy-generation latency of the edited model with 100 experts against the unedited model.

    python benchmarks/core_speed.py --out results/core_speed.json            # 1000 edits -> 100 trained experts
    python benchmarks/core_speed.py --quick --out results/core_speed.json    # 50 edits, padded to 100 experts

In --quick mode the experts beyond the trained ones are synthetic (random non-zero weights,
anchors from further ZsRE prompts), which costs the same at inference; the JSON says how many.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def zsre_records(path: Path, start: int, count: int) -> list:
    from lemoe import EditRecord

    rows = json.loads(path.read_text())[start : start + count]
    return [EditRecord(prompt=r["src"], target=r["alt"], rephrase=r["rephrase"], locality_prompt=r["loc"],
                       locality_answer=r["loc_ans"]) for r in rows]


def add_synthetic_experts(editor, prompts: list[str], count: int, batch: int = 10) -> None:
    """Experts with random non-zero weights and real-prompt anchors: inference cost of trained ones."""
    router = editor.adaptor.router
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        expert_id = editor.adaptor.add_expert(editor.adaptor.new_expert())
        for param in editor.adaptor.experts[expert_id].parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        chunk = prompts[i * batch : (i + 1) * batch]
        router.add_expert_key(editor.pooled_prompts(chunk), editor._negative_vectors())


def time_generation(model, tok, editor, prompts: list[str], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(unedited, edited) seconds: per prompt, best of `repeats` greedy generations (batch size 1).

    Unedited = the adaptor disabled (the base FFN alone), timed interleaved with the edited model
    in the same process, so that drift in machine speed hits both alike.
    """
    unedited = edited = 0.0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):
            for enabled in (False, True):
                started = time.perf_counter()
                if enabled:
                    _generate(model, tok, ids, new_tokens)
                else:
                    with editor.disabled():
                        _generate(model, tok, ids, new_tokens)
                best[enabled] = min(best[enabled], time.perf_counter() - started)
        unedited += best[False]
        edited += best[True]
    return unedited, edited


def _generate(model, tok, ids, new_tokens: int) -> None:
    model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="50 trained edits instead of 1000 (under 5 minutes)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    parser.add_argument("--data", default=str(SHARED_DATA / "zsre" / "zsre_mend_dev.json"))
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--experts", type=int, default=100, help="experts in the edited model for the latency test")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import lemoe
    from lemoe import LifelongEditor, load_model
    from lemoe.bench import git_commit

    model, tok = load_model()
    trained_edits = 50 if args.quick else args.experts * args.batch_size
    edits = zsre_records(Path(args.data), 0, trained_edits)
    probe_edited = [e.prompt for e in edits[:10]]
    probe_unrelated = [e.locality_prompt for e in edits[:10]]

    editor = LifelongEditor(model, tok)
    batch_seconds, batch_steps = [], []
    started = time.perf_counter()
    for report in editor.edit_stream(edits, args.batch_size):
        batch_seconds.append(report.seconds)
        batch_steps.append(report.steps)
        print(f"batch {report.batch}: {report.seconds:.2f}s, {report.steps} steps", flush=True)
    edit_wall = time.perf_counter() - started
    trained_experts = editor.num_experts
    synthetic = max(0, args.experts - trained_experts)
    if synthetic:
        extra = zsre_records(Path(args.data), trained_edits, synthetic * args.batch_size)
        add_synthetic_experts(editor, [e.prompt for e in extra], synthetic, args.batch_size)

    base_edited, edited_edited = time_generation(model, tok, editor, probe_edited, args.new_tokens, args.repeats)
    base_unrelated, edited_unrelated = time_generation(model, tok, editor, probe_unrelated, args.new_tokens,
                                                       args.repeats)
    routes = editor.route(probe_edited + probe_unrelated)

    tokens = args.new_tokens * len(probe_edited)
    base_total, edited_total = base_edited + base_unrelated, edited_edited + edited_unrelated
    result = {
        "benchmark": "core_speed",
        "model": "smollm2-135m (SmolLM2-135M-Instruct, fp32)",
        "data": str(Path(args.data).name),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "batch_size": args.batch_size,
        "edits": len(edits),
        "expert_kind": editor.config.expert,
        "seconds_per_edit": edit_wall / len(edits),
        "seconds_per_edit_median_batch": statistics.median(batch_seconds) / args.batch_size,
        "batch_seconds": batch_seconds,
        "batch_steps": batch_steps,
        "generation": {
            "experts": editor.num_experts,
            "trained_experts": trained_experts,
            "synthetic_experts": synthetic,
            "new_tokens": args.new_tokens,
            "prompts": len(probe_edited) + len(probe_unrelated),
            "edited_prompts_routed": sum(r is not None for r in routes[: len(probe_edited)]),
            "unrelated_prompts_deferred": sum(r is None for r in routes[len(probe_edited):]),
            "unedited": "adaptor disabled (base FFN only), timed interleaved with the edited model",
            "unedited_seconds": base_total,
            "edited_seconds": edited_total,
            "latency_ratio": edited_total / base_total,
            "latency_ratio_edited_prompts": edited_edited / base_edited,
            "latency_ratio_unrelated_prompts": edited_unrelated / base_unrelated,
            "tokens_per_second_unedited": 2 * tokens / base_total,
            "tokens_per_second_edited": 2 * tokens / edited_total,
        },
        "targets": {"seconds_per_edit": 1.0, "latency_ratio": 1.05},
        "lemoe_version": lemoe.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/core_speed.py" + (" --quick" if args.quick else "") + f" --out {args.out}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    gen = result["generation"]
    print(f"\nseconds per edit: {result['seconds_per_edit']:.3f} (target <= 1.0), {len(edits)} edits, "
          f"batch {args.batch_size}, {result['threads']} threads")
    print(f"generation with {gen['experts']} experts ({synthetic} synthetic): latency ratio "
          f"{gen['latency_ratio']:.3f} (target <= 1.05); edited prompts {gen['latency_ratio_edited_prompts']:.3f}, "
          f"unrelated {gen['latency_ratio_unrelated_prompts']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
