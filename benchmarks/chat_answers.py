"""Chat answers as a chat user reads them, after editing (issue 12): greedy, stopping at the end of turn.

    python benchmarks/chat_answers.py --out results/chat_answers_mend_T30.json

Edits the first T records of a data file (batches of 10, stream order, default config), then sends each
record's chat question (its `question` probe, else its first rephrase, else its prompt) through the chat
template and decodes greedily up to 32 tokens, stopping at the end of turn as a chat client does.
Reports, over the edits, the share of replies that contain the target, that start with it, and that are
the target alone (up to a final full stop), and every reply; and, for the edited prompts' own 24-token
continuations, how often one names another edit's target at all (the bench's `leak`) and before its
first end of sequence (what a client that stops there shows). Runs on lemoe 0.7 too (to compare the
chat-row format of lemoe 0.7 with 0.8's: check out the older commit and run this file from here).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from common import SHARED_DATA, header, write_json


def chat_prompt(tok: Any, question: str) -> list[int]:
    try:
        from lemoe.encoding import chat_prompt_ids
    except ImportError:  # lemoe <= 0.7
        from lemoe.probe_metrics import chat_ids as chat_prompt_ids
    return chat_prompt_ids(tok, question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=str(SHARED_DATA / "zsre" / "zsre_mend_dev.json"))
    parser.add_argument("--T", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lemoe
    from lemoe import LifelongEditor, load_model
    from lemoe.data import read_edits
    from lemoe.probe_metrics import chat_question

    records = read_edits(args.data)[: args.T]
    model, tok = load_model()
    editor = LifelongEditor(model, tok)
    started = time.perf_counter()
    editor.edit_stream(records, 10)
    seconds = time.perf_counter() - started
    replies, counts = [], {"contains": 0, "starts": 0, "alone": 0, "ended": 0}
    for record in records:
        ids = chat_prompt(tok, chat_question(record))
        row = torch.tensor([ids])  # (1, T)
        out = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=32, do_sample=False)
        new = out[0, len(ids):].tolist()
        text = tok.decode(new, skip_special_tokens=True).strip()
        target = record.target.strip().lower()
        found = {"contains": target in text.lower(), "starts": text.lower().startswith(target),
                 "alone": text.lower().rstrip(" .") == target, "ended": tok.eos_token_id in new}
        for key, hit in found.items():
            counts[key] += int(hit)
        replies.append({"question": chat_question(record), "target": record.target, "reply": text, **found})
    # the edited prompts' continuations: does one name another edit's target (the bench's `leak`, 24 tokens,
    # decoded past any end of sequence), and does it do so before its first end of sequence (where a client stops)
    others = [r.target.strip().lower() for r in records]
    leaks = {"leak_24_tokens": 0, "leak_before_end": 0, "ended": 0}
    for i, record in enumerate(records):
        ids = tok(record.prompt)["input_ids"]
        row = torch.tensor([ids])  # (1, T)
        out = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        end = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
        own = others[i]

        def names_another(text: str, own: str = own, i: int = i) -> bool:
            return any(t and t != own and t not in own and t in text for j, t in enumerate(others) if j != i)

        leaks["leak_24_tokens"] += int(names_another(tok.decode(new).lower()))
        leaks["leak_before_end"] += int(names_another(tok.decode(new[:end]).lower()))
        leaks["ended"] += int(end < len(new))
        replies[i]["prompt_continuation"] = tok.decode(new)
    counts.update({f"prompt_{key}": value for key, value in leaks.items()})
    write_json(args.out, {**header("chat_answers", args), "lemoe_version_edited": lemoe.__version__,
                          "data": args.data, "T": len(records), "seconds_per_edit": seconds / len(records),
                          **{key: value / len(records) for key, value in counts.items()}, "replies": replies})
    print({key: round(value / len(records), 3) for key, value in counts.items()})


if __name__ == "__main__":
    main()
