"""Where and with what a result was measured: versions, threads, machine, commit, date.

Recorded with every result JSON (bench summaries, comparisons, benchmarks) and printed by
`lemoe --version`, so a number can be traced to the library versions that produced it.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__

TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "huggingface_hub", "gguf",
                    "numpy")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Python, lemoe and every runtime dependency that decides a result (None: not installed)."""
    return {"python": platform.python_version(), "lemoe": __version__,
            **{name: package_version(name) for name in TRACKED_PACKAGES}}


@functools.cache
def git_commit() -> str:
    """HEAD of the lemoe checkout the first time a process asks (a bench asks when it starts, so commits made
    while it runs are not credited with its results), or 'unknown' outside one (an installed wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.cache
def _cpuinfo() -> list[str]:
    """/proc/cpuinfo's lines (Linux), read once; [] elsewhere."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), or None elsewhere."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):  # x86, ARM
            return frozenset(line.partition(":")[2].split())
    return None


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def native_bfloat16_cpu() -> bool | None:
    """Whether the CPU has bfloat16 matrix units (x86 AVX-512 BF16 or AMX, ARM BF16): without them a
    bfloat16 matrix product ran 6-7x slower than float32 here (docs/results.md). None: not known."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_description() -> dict[str, Any]:
    """What a CPU timing depends on: the model, the instruction set PyTorch uses, bfloat16 units."""
    import torch

    return {"model": cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bfloat16": native_bfloat16_cpu()}


def provenance() -> dict[str, Any]:
    """What every result JSON records beside its numbers."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_description(),
        "lemoe_version": __version__,
        "torch_version": torch.__version__,
        "versions": versions(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def version_text() -> str:
    """`lemoe --version`: one line per package."""
    lines = [f"lemoe {__version__}", f"  python {platform.python_version()} ({sys.executable})"]
    for name, version in versions().items():
        if name not in ("python", "lemoe"):
            lines.append(f"  {name} {version or 'not installed'}")
    lines.append(f"  git commit {git_commit()}")
    return "\n".join(lines)
