"""Helpers shared by the benchmark scripts: data, synthetic experts, timing, the JSON header."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ZSRE_MEND = SHARED_DATA / "zsre" / "zsre_mend_dev.json"


def zsre_records(start: int, count: int, path: Path = ZSRE_MEND) -> list:
    """MEND-format ZsRE records [start, start + count) as EditRecords (unrelated NQ locality)."""
    from lemoe.data import read_edits

    records = read_edits(path)
    if start + count > len(records):
        raise SystemExit(f"{path.name} holds {len(records)} records; asked for {start}..{start + count}")
    return records[start : start + count]


def add_synthetic_experts(editor: Any, prompts: list[str], count: int, per_expert: int = 10) -> None:
    """Experts with random non-zero weights and real-prompt anchors: the inference cost of trained
    ones (routing and expert compute do not depend on what the weights learned)."""
    if count <= 0:
        return
    if len(prompts) < count * per_expert:
        raise ValueError(f"{count} experts x {per_expert} anchors need {count * per_expert} prompts, got {len(prompts)}")
    router = editor.adaptor.router
    generator = torch.Generator().manual_seed(1)
    pooled = editor.pooled_prompts(prompts[: count * per_expert], batch_size=64)
    negatives = editor._negative_vectors()
    if not bool(router.stats_fitted):
        router.fit_statistics(torch.cat([pooled[:per_expert], negatives]))
    for i in range(count):
        expert_id = editor.adaptor.add_expert(editor.adaptor.new_expert())
        for param in editor.adaptor.experts[expert_id].parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        router.add_expert_key(pooled[i * per_expert : (i + 1) * per_expert], negatives)


def greedy(model: Any, tok: Any, ids: dict[str, torch.Tensor], new_tokens: int) -> None:
    model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device | str = "cpu") -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def header(name: str, args: Any, device: str = "cpu") -> dict[str, Any]:
    """What every result JSON records: machine, threads, versions, commit, date, the command."""
    from lemoe.provenance import provenance

    info: dict[str, Any] = {
        "benchmark": name,
        "model": "smollm2-135m (SmolLM2-135M-Instruct)",
        "device": device,
        **provenance(),
        "command": "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def table(rows: list[tuple[Any, ...]], header_row: list[str]) -> str:
    cells = [[str(c) if not isinstance(c, float) else f"{c:.4g}" for c in row] for row in [header_row, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header_row))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
