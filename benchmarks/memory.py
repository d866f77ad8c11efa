"""Bytes per expert on disk and in RAM, per expert kind, and the process's peak RSS.

    python benchmarks/memory.py --out results/memory.json [--quick]

Per kind: N experts (the first few trained on real ZsRE edits, the rest synthetic with real-prompt
anchors: same tensors, same sizes), saved as an adapter at N/2 and at N experts. Bytes per expert
on disk = growth of adapter_model.safetensors per added expert; in RAM = growth of the adaptor's
tensors (expert weights, anchors and the pooled prompts kept for consistency checks, thresholds)
and of the process's resident set per added expert.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch

from common import add_synthetic_experts, header, table, write_json, zsre_records


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="40 experts per kind instead of 200")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly; recorded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LEMoEConfig, LifelongEditor, load_model

    model, tok = load_model()
    n = 40 if args.quick else 200
    trained = 3
    records = zsre_records(0, 2000)
    prompts = [r.prompt for r in records]
    rows = []
    for kind in ("lora", "ffn"):
        editor = LifelongEditor(model, tok, LEMoEConfig(expert=kind))
        for b in range(trained):
            editor.edit(records[10 * b : 10 * b + 10])
        sizes, ram, rss = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for target in (n // 2, n):
                add_synthetic_experts(editor, prompts, target - editor.num_experts)  # sizes do not depend on which
                editor.save(Path(tmp) / str(target))
                sizes[target] = (Path(tmp) / str(target) / "adapter_model.safetensors").stat().st_size
                ram[target] = tensor_bytes(editor.adapter_tensors())
                rss[target] = rss_bytes()
        half = n - n // 2
        row = {"expert_kind": kind, "experts": n, "trained_experts": trained,
               "bytes_per_expert": (sizes[n] - sizes[n // 2]) / half,
               "bytes_per_expert_in_ram_tensors": (ram[n] - ram[n // 2]) / half,
               "rss_growth_per_expert": (rss[n] - rss[n // 2]) / half,
               "adapter_file_bytes": sizes[n],
               "expert_weight_bytes": sum(p.numel() * p.element_size() for p in editor.adaptor.experts[0].parameters())}
        rows.append(row)
        print(f"{kind}: {row['bytes_per_expert'] / 1e6:.3f} MB per expert on disk, "
              f"{row['bytes_per_expert_in_ram_tensors'] / 1e6:.3f} MB in tensors, "
              f"RSS +{row['rss_growth_per_expert'] / 1e6:.3f} MB per expert", flush=True)
        editor.unload()
    default = next(r for r in rows if r["expert_kind"] == LEMoEConfig().expert)
    result = {**header("memory", args), "dtype": "fp32", "anchors_per_expert": 10,
              "bytes_per_expert": default["bytes_per_expert"], "expert_kind": default["expert_kind"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kinds": rows,
              "targets": {"bytes_per_expert": 1_000_000}}
    write_json(args.out, result)
    print(table([(r["expert_kind"], r["bytes_per_expert"], r["bytes_per_expert_in_ram_tensors"],
                  r["rss_growth_per_expert"], r["expert_weight_bytes"]) for r in rows],
                ["kind", "disk B/expert", "RAM tensors B/expert", "RSS B/expert", "weights B/expert"]))
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
