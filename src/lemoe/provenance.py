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


def provenance() -> dict[str, Any]:
    """What every result JSON records beside its numbers."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "machine": f"{platform.system()} {platform.machine()}",
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
