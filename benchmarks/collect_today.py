"""The table of today's numbers (issue 11) from the result directories of benchmarks/todays_numbers.sh:
one markdown row per run, every probe family, the unedited model's value in brackets.

    python benchmarks/collect_today.py results/today_0.5 > /tmp/today.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = [  # (header, section, key, unedited key)
    ("rel_gen", "generative", "rel_gen", "rel_gen"),
    ("gen (tf)", "final", "gen", None),
    ("gen_gen", "generative", "gen_gen", "gen_gen"),
    ("chat_gen", "generative", "chat_gen", "chat_gen"),
    ("chat_clean", "generative", "chat_clean", "chat_clean"),
    ("paraphrase score", "probability", "paraphrase_score", "paraphrase_score"),
    ("portability (tf)", "teacher_forced", "portability", None),
    ("loc_gen unrelated", "generative", "loc_gen_unrelated", None),
    ("loc_gen neighbour", "generative", "loc_gen_neighbour", None),
    ("loc_gen same subject", "generative", "loc_gen_same_subject", None),
    ("loc same subject (tf)", "teacher_forced", "loc_same_subject", None),
    ("loc_gen distracting", "generative", "loc_gen_distracting", None),
    ("neighbourhood score", "probability", "neighbourhood_score", "neighbourhood_score"),
    ("leak", "generative", "leak", "leak"),
    ("fluency (bits)", "generative", "fluency", "fluency"),
    ("routing consistency", None, "routing_consistency", None),
    ("s/edit", None, "seconds_per_edit", None),
]


def cell(summary: dict[str, Any], section: str | None, key: str, unedited: str | None) -> str:
    value = (summary.get(section) or {}).get(key) if section else summary.get(key)
    if value is None:
        return "–"
    text = f"{value:.2f}" if key == "seconds_per_edit" else f"{value:.3f}"
    before = (summary.get("unedited") or {}).get(unedited) if unedited else None
    return f"{text} ({before:.2f})" if before is not None else text


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/today_0.5")
    print("| run | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        name = f"{path.parent.name} (T={summary['T']})"
        print(f"| {name} | " + " | ".join(cell(summary, *c[1:]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
