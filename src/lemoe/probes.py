"""Probes: the questions an edit is judged on, each with its kind.

An edit must hold wherever a user asks (rephrases, portability questions) and nowhere else
(locality probes of four kinds, hardest last). Data sets carry many probes per edit; readers keep
all of them, so that metrics can report each kind apart (issue 11). Probes are evaluation data:
they never train an expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# where the edit must hold
REPHRASE = "rephrase"
# the edit asked as a question, which `chat_gen` sends through the chat template (else the first rephrase)
QUESTION = "question"
PORTABILITY_KINDS = ("subject_aliasing", "reasoning", "logical_generalization", "one_hop")
# where it must not: unrelated text, same relation with another subject, another relation of the
# same subject, and a neighbour asked right after the edited fact is stated
LOCALITY_KINDS = ("unrelated", "neighbour", "same_subject", "distracting")
# free continuations, for fluency
GENERATION = "generation"

KINDS = (REPHRASE, QUESTION, *PORTABILITY_KINDS, *LOCALITY_KINDS, GENERATION)


class ProbeError(ValueError):
    """A malformed probe; the message names the field."""


@dataclass(frozen=True)
class Probe:
    """One probe: a prompt, its expected answer (None for generation prompts) and accepted aliases.

    For a rephrase or portability probe the answer is what the *edited* model must say; for a
    locality probe it is the true answer the unedited model should keep (metrics compare with the
    unedited model's own output, so a missing answer is allowed there too).
    """

    kind: str
    prompt: str
    answer: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ProbeError(f"probe kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ProbeError(f"{self.kind} probe has an empty or non-string 'prompt'")
        if self.answer is not None and (not isinstance(self.answer, str) or not self.answer.strip()):
            raise ProbeError(f"{self.kind} probe {self.prompt[:60]!r}: 'answer' must be a non-empty string or null")
        if not isinstance(self.aliases, tuple) or not all(isinstance(a, str) for a in self.aliases):
            raise ProbeError(f"{self.kind} probe {self.prompt[:60]!r}: 'aliases' must be a list of strings")

    @property
    def is_locality(self) -> bool:
        return self.kind in LOCALITY_KINDS

    @property
    def is_portability(self) -> bool:
        return self.kind in PORTABILITY_KINDS

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "prompt": self.prompt}
        if self.answer is not None:
            data["answer"] = self.answer
        if self.aliases:
            data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Probe":
        if not isinstance(data, dict):
            raise ProbeError(f"a probe must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"kind", "prompt", "answer", "aliases"})
        if unknown:
            raise ProbeError(f"probe has unknown field {unknown[0]!r} (known: kind, prompt, answer, aliases)")
        for name in ("kind", "prompt"):
            if name not in data:
                raise ProbeError(f"probe lacks field {name!r}")
        aliases = data.get("aliases", [])
        if not isinstance(aliases, list):
            raise ProbeError(f"probe {str(data['prompt'])[:60]!r}: 'aliases' must be a list of strings")
        return cls(kind=data["kind"], prompt=data["prompt"], answer=data.get("answer"), aliases=tuple(aliases))


def answers(value: Any, where: str) -> tuple[str, ...]:
    """Every accepted answer, canonical first, from the shapes data sets use: a string, a list of
    strings, or a list of alias lists (KnowEdit test splits). Empty strings are dropped."""
    if isinstance(value, str):
        flat = [value]
    elif isinstance(value, list):
        flat = []
        for item in value:
            if isinstance(item, str):
                flat.append(item)
            elif isinstance(item, list) and all(isinstance(a, str) for a in item):
                flat.extend(item)
            else:
                raise ProbeError(f"{where}: answers must be a string, a list of strings or a list of alias lists")
    else:
        raise ProbeError(f"{where}: answers must be a string, a list of strings or a list of alias lists, "
                         f"got {type(value).__name__}")
    kept = [a for a in dict.fromkeys(flat) if a.strip()]
    if not kept:
        raise ProbeError(f"{where}: no non-empty answer")
    return tuple(kept)


def answered(kind: str, prompt: str, value: Any, where: str) -> Probe:
    """A probe whose answers come in any of the data sets' shapes."""
    found = answers(value, where)
    return Probe(kind, prompt, found[0], found[1:])
