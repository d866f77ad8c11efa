"""Assemble one comparison from result directories of `lemoe bench` runs of the same setting.

    python benchmarks/collect_comparison.py --out results/comparison_X DIR/lemoe DIR/grace OTHER/wise ...

For comparisons whose methods were run by more than one command (e.g. two processes, one core
each): reads each directory's summary.json, checks that data, T, batch size and order agree, and
writes comparison.json, comparison.md and forgetting_curves.png to --out, as `lemoe bench
--method a,b,...` does. Each summary keeps its own command-independent provenance (commit, threads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lemoe.bench import comparison_result, write_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("dirs", nargs="+", help="result directories holding summary.json")
    args = parser.parse_args()
    summaries = {}
    for directory in args.dirs:
        summary = json.loads((Path(directory) / "summary.json").read_text())
        summaries[summary["method"]] = summary
    result = comparison_result(summaries)
    result["assembled_from"] = args.dirs
    write_comparison(Path(args.out), result)
    print((Path(args.out) / "comparison.md").read_text())


if __name__ == "__main__":
    main()
