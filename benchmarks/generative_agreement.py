"""The bench's generative numbers against an independent computation on SmolLM2 (issue 11, "done when").

    python benchmarks/generative_agreement.py --out results/generative_agreement.json

For each data file: edits its first T records (batches of 10, stream order, default config), then scores
every generative metric twice on the same edited model:
- as `lemoe bench` does (`ProbeEvaluator`: left-padded batches of 64, deferred probes reuse the unedited
  model's continuation, the bench's exact match as `rel_gen`);
- independently, here: one prompt at a time through `model.generate`, greedy, no padding, the
  definitions of docs/results.md written out again, the unedited continuations taken before the edits.
Reports both macro averages per metric, their largest difference (issue 11 asks for at most 0.02) and
the number of (edit, metric) pairs that differ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import SHARED_DATA, header, write_json

DEFAULT_DATA = ("counterfact/counterfact_rome_format_dev.json", "zsre/knowedit_zsre_test.json",
                "zsre/zsre_mend_dev.json")


def greedy_alone(model: Any, tok: Any, ids: list[int], steps: int) -> list[int]:
    row = torch.tensor([ids])  # (1, T); the mask given: SmolLM2 pads with <|im_end|>, which chat prompts contain
    out = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=steps, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, len(ids):].tolist()


def chat_prompt(tok: Any, question: str) -> list[int] | None:
    if not getattr(tok, "chat_template", None):
        return None
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def bigram_trigram_entropy(text: str) -> float:
    """ROME's weighted n-gram entropy (2/3 bigrams, 4/3 trigrams), written out again."""
    import math
    import re
    from collections import Counter

    words = re.findall(r"\w+|[^\w\s]", text)
    total = 0.0
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
        count = sum(grams.values())
        entropy = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += weight * entropy
    return total / 2


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def independent_scores(model: Any, tok: Any, records: list, unedited_loc: dict, kinds: tuple[str, ...]
                       ) -> dict[str, list[Any]]:
    """Every generative metric per edit, one prompt at a time."""
    scores: dict[str, list[Any]] = {k: [] for k in ("rel_gen", "gen_gen", "chat_gen", "chat_clean", "leak", "fluency",
                                                    *(f"loc_gen_{kind}" for kind in kinds))}
    lowered = [r.target.strip().lower() for r in records]
    for i, record in enumerate(records):
        target = tok(" " + record.target.strip(), add_special_tokens=False)["input_ids"]
        scores["rel_gen"].append(float(greedy_alone(model, tok, tok(record.prompt)["input_ids"], len(target))
                                       == target))
        gen = [float(record.target.strip().lower() in tok.decode(
            greedy_alone(model, tok, tok(p.prompt)["input_ids"], len(target) + 8)).lower())
            for p in record.probes_of("rephrase")]
        scores["gen_gen"].append(mean_or_none(gen))
        asked = (record.probes_of("question") or record.probes_of("rephrase"))
        chat = chat_prompt(tok, asked[0].prompt if asked else record.prompt)
        reply = greedy_alone(model, tok, chat, 32) if chat is not None else None
        target_text = record.target.strip().lower()
        scores["chat_gen"].append(None if reply is None else float(target_text in tok.decode(reply).lower()))
        # SmolLM2's end of turn is its end of sequence (<|im_end|>)
        ended = reply.index(tok.eos_token_id) if reply is not None and tok.eos_token_id in reply else None
        scores["chat_clean"].append(None if reply is None else float(
            ended is not None and record.target.strip().lower() in tok.decode(reply[:ended]).lower()))
        for kind in kinds:
            same = [float(greedy_alone(model, tok, tok(p.prompt)["input_ids"], 8) == unedited_loc[(i, kind, p.prompt)])
                    for p in record.probes_of(kind)]
            scores[f"loc_gen_{kind}"].append(mean_or_none(same))
        generation = record.probes_of("generation")
        continuation = greedy_alone(model, tok, tok(record.prompt)["input_ids"], 24 if generation else 64)
        text = tok.decode(continuation[:24]).lower()
        scores["leak"].append(float(any(t and t != lowered[i] and t not in lowered[i] and t in text
                                        for j, t in enumerate(lowered) if j != i)))
        free = greedy_alone(model, tok, tok(generation[0].prompt)["input_ids"], 64) if generation else continuation
        scores["fluency"].append(bigram_trigram_entropy(tok.decode(free, skip_special_tokens=True)))
    return scores


def compare(ours: dict[str, list[Any]], theirs: dict[str, list[Any]]) -> dict[str, Any]:
    rows, differing, worst = {}, 0, 0.0
    for key, values in theirs.items():
        mine = ours[key]
        pairs = [(a, b) for a, b in zip(mine, values) if a is not None or b is not None]
        differ = sum(1 for a, b in pairs if a is None or b is None or abs(a - b) > 1e-9)
        a = mean_or_none([x for x in mine if x is not None])
        b = mean_or_none([x for x in values if x is not None])
        gap = abs(a - b) if a is not None and b is not None else (0.0 if a == b else float("inf"))
        if key != "fluency":  # bits, not a rate: reported, not held to 0.02
            worst = max(worst, gap)
        differing += differ
        rows[key] = {"bench": a, "independent": b, "difference": gap, "edits_differing": differ,
                     "edits_defined": sum(1 for x in values if x is not None)}
    return {"metrics": rows, "largest_rate_difference": worst, "pairs_differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", nargs="+", default=[str(SHARED_DATA / d) for d in DEFAULT_DATA])
    parser.add_argument("--T", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lemoe import LifelongEditor, load_model
    from lemoe.data import read_edits
    from lemoe.metrics import generative_exact_match
    from lemoe.probe_metrics import ProbeEvaluator
    from lemoe.probes import LOCALITY_KINDS

    results = []
    for path in args.data:
        started = time.perf_counter()
        records = read_edits(path)[: args.T]
        model, tok = load_model()
        kinds = tuple(k for k in LOCALITY_KINDS if any(r.probes_of(k) for r in records))
        unedited_loc = {(i, p.kind, p.prompt): greedy_alone(model, tok, tok(p.prompt)["input_ids"], 8)
                        for i, r in enumerate(records) for p in r.all_probes() if p.kind in kinds}
        evaluator = ProbeEvaluator(model, tok, records)  # takes the unedited outputs now, as the bench does
        editor = LifelongEditor(model, tok)
        editor.edit_stream(records, 10)
        exact = generative_exact_match(model, tok, [r.prompt for r in records], [r.target for r in records])
        ours = evaluator.evaluate(range(len(records)), exact_match=exact, router=editor)
        theirs = independent_scores(model, tok, records, unedited_loc, kinds)
        result = {"data": Path(path).name, "T": len(records), **compare(ours, theirs),
                  "seconds": time.perf_counter() - started}
        print(f"{result['data']}: largest difference {result['largest_rate_difference']:.4f}, "
              f"{result['pairs_differing']} (edit, metric) pairs differ")
        results.append(result)
    write_json(args.out, {**header("generative_agreement", args), "runs": results,
                          "largest_rate_difference": max(r["largest_rate_difference"] for r in results)})


if __name__ == "__main__":
    main()
