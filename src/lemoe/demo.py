"""The demo: built-in facts, each asked the ways a user asks, before and after editing (issue 11).

Every built-in fact carries its edited prompt, a cloze rephrase, a chat question, two neighbours
(the same template, another subject) and two same-subject facts (another relation). Each probe is
decoded greedily before and after the edits and judged by the bench's generative definitions
(`lemoe.probe_metrics`), so the marks the demo prints are the scores it reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence

from torch import nn

from .data import EditRecord
from .encoding import chat_prompt_ids, encode_answer
from .metrics import greedy_from_ids
from .probe_metrics import CHAT_TOKENS, GEN_EXTRA_TOKENS, LOC_TOKENS, chat_question, prompt_ids
from .probes import REPHRASE

# (section title, what a pass means); the order the demo prints them in
SECTIONS = (
    ("edited prompt", "continuation starts with the new target"),
    ("rephrase", "continuation contains the new target"),
    ("chat question", "chat answer contains the new target"),
    ("neighbour", "continuation unchanged (same template, other subject)"),
    ("same subject", "continuation unchanged (same subject, other relation)"),
)


def demo_edits(n: int | None = None) -> list[EditRecord]:
    """The built-in facts (src/lemoe/resources/demo_edits.json), the first `n` of them."""
    raw = json.loads(resources.files("lemoe").joinpath("resources/demo_edits.json").read_text(encoding="utf-8"))
    edits = [EditRecord.from_dict(r, f"demo record {i}") for i, r in enumerate(raw)]
    return edits if n is None else edits[:n]


@dataclass
class DemoProbe:
    section: str
    edit: int
    shown: str  # the prompt (or the chat question) as the user typed it
    expected: str  # the new target, or the answer the unedited model should keep
    ids: list[int]
    steps: int
    before: list[int] | None = None
    after: list[int] | None = None

    def passed(self, tokenizer: Any, target_ids: list[int]) -> bool:
        """The bench's definition for this section, on the edited model's output."""
        after = self.after or []
        if self.section == "edited prompt":
            return after[: len(target_ids)] == target_ids
        if self.section in ("neighbour", "same subject"):
            return after == self.before
        return self.expected.strip().lower() in tokenizer.decode(after).lower()


def demo_probes(tokenizer: Any, edits: Sequence[EditRecord]) -> list[DemoProbe]:
    """Every probe of every edit, with the token budget its generative metric uses."""
    probes = []
    for i, edit in enumerate(edits):
        target_len = len(encode_answer(tokenizer, edit.target))
        probes.append(DemoProbe("edited prompt", i, edit.prompt, edit.target, prompt_ids(tokenizer, edit.prompt),
                                target_len))
        for probe in edit.probes_of(REPHRASE):
            probes.append(DemoProbe("rephrase", i, probe.prompt, edit.target, prompt_ids(tokenizer, probe.prompt),
                                    target_len + GEN_EXTRA_TOKENS))
        question = chat_question(edit)
        chat = chat_prompt_ids(tokenizer, question)
        if chat is not None:
            probes.append(DemoProbe("chat question", i, question, edit.target, chat, CHAT_TOKENS))
        for kind, section in (("neighbour", "neighbour"), ("same_subject", "same subject")):
            for probe in edit.probes_of(kind):
                probes.append(DemoProbe(section, i, probe.prompt, probe.answer or "",
                                        prompt_ids(tokenizer, probe.prompt), LOC_TOKENS))
    return probes


def decode_probes(model: nn.Module, tokenizer: Any, probes: Sequence[DemoProbe], when: str) -> None:
    """Greedy outputs of every probe, stored as `before` or `after`."""
    outputs = greedy_from_ids(model, tokenizer, [p.ids for p in probes], [p.steps for p in probes])
    for probe, tokens in zip(probes, outputs):
        setattr(probe, when, tokens)


def section_scores(tokenizer: Any, edits: Sequence[EditRecord], probes: Sequence[DemoProbe]
                   ) -> dict[str, tuple[int, int]]:
    """Per section, (passed, total) over its probes."""
    targets = [encode_answer(tokenizer, e.target) for e in edits]
    scores: dict[str, tuple[int, int]] = {}
    for section, _ in SECTIONS:
        chosen = [p for p in probes if p.section == section]
        scores[section] = (sum(p.passed(tokenizer, targets[p.edit]) for p in chosen), len(chosen))
    return scores


def short_text(tokenizer: Any) -> Callable[[list[int] | None], str]:
    """A one-line preview of a decoded continuation for tables."""
    def preview(ids: list[int] | None) -> str:
        text = tokenizer.decode(ids or [], skip_special_tokens=True).strip().replace("\n", " ")
        return text[:40]
    return preview
