"""The served model: one LifelongEditor, generation with the expert each request was routed to, edits that
answer only once saved, and the follower that reloads another process's adapter.

Threads: every request runs in the web framework's thread pool. A generation decides its expert and
decodes under one `editor.snapshot()`, so it sees one set of experts from its first token to its last; an
edit trains beside generations (the new expert hidden until saved); edits and rollbacks queue on the
editor's own lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..data import EditRecord
from ..editor import LifelongEditor
from ..encoding import chat_template_ids, pad_id
from ..persistence import WEIGHTS_NAME

logger = logging.getLogger("lemoe")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    expert: int | None
    prompt_tokens: int
    completion_tokens: int


class _StopOnStrings:
    """A `StoppingCriteria` (transformers' public interface: called with ids and scores): true once the
    decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer: Any, start: int, stops: list[str]) -> None:
        self.tokenizer, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        done = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ServedModel:
    def __init__(self, model: Any, tokenizer: Any, editor: LifelongEditor, adapter_dir: Path, name: str,
                 read_only: bool = False) -> None:
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.adapter_dir, self.name, self.read_only = Path(adapter_dir), name, read_only
        self._seeded = threading.Lock()  # torch's global generator: seeded samplings one at a time
        self._follower: threading.Thread | None = None
        self._stop_following = threading.Event()
        self.created = int(time.time())

    # ------------------------------------------------------------------ generation

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        return chat_template_ids(self.tokenizer, messages, add_generation_prompt=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and len(ids) + max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                             f"of {limit}")

    def complete(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stops: list[str],
                 seed: int | None, streamer: Any = None, on_expert: Callable[[int | None], None] | None = None
                 ) -> Completion:
        """Decode one continuation; the expert is decided and used under one snapshot of the experts."""
        self.check_length(ids, max_tokens)
        input_ids = torch.tensor([ids], device=self.editor.input_device)
        sampling = temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sampling,
                                  "pad_token_id": pad_id(self.tokenizer), "streamer": streamer}
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if stops:
            kwargs["stopping_criteria"] = [_StopOnStrings(self.tokenizer, len(ids), stops)]
        with self.editor.snapshot():
            expert = self.editor.route_ids([ids])[0] if self.editor.num_experts else None
            if on_expert is not None:
                on_expert(expert)
            with self._seeded if (sampling and seed is not None) else nullcontext():
                if sampling and seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                             **kwargs)
        new = output[0, len(ids):].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length"
        cut = [text.index(s) for s in stops if s in text]
        if cut:
            text, finish = text[: min(cut)], "stop"
        elif len(new) < max_tokens or (new and new[-1] == self.tokenizer.eos_token_id):
            finish = "stop"
        return Completion(text, finish, expert, len(ids), len(new))

    # ------------------------------------------------------------------ editing

    def edit(self, records: list[EditRecord]) -> dict[str, Any]:
        """Train and save one expert; returns its report only after the adapter directory holds it."""
        report = self.editor.edit(records)
        return {**report.to_dict(), "edits_total": len(self.editor.edits), "experts": self.editor.num_experts}

    def rollback(self, batches: int) -> dict[str, Any]:
        removed = self.editor.rollback(batches)
        return {"removed_batches": batches, "removed_edits": removed, "experts": self.editor.num_experts,
                "edits_total": len(self.editor.edits)}

    def edits(self, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        with self.editor.snapshot():
            edits = list(self.editor.edits)
        return [{"index": i, **e} for i, e in enumerate(edits[offset : offset + limit], start=offset)], len(edits)

    # ------------------------------------------------------------------ following another writer

    def follow(self, every: float = 1.0) -> None:
        """Reload the adapter whenever its weights file is replaced (a writer's atomic rename)."""
        def stamp() -> tuple[int, int, int] | None:
            try:
                info = os.stat(self.adapter_dir / WEIGHTS_NAME)
            except OSError:
                return None
            return info.st_ino, info.st_mtime_ns, info.st_size

        def loop() -> None:
            seen = stamp()
            while not self._stop_following.wait(every):
                now = stamp()
                if now is None or now == seen:
                    continue
                try:
                    if self.editor.reload(self.adapter_dir):
                        logger.info("reloaded %s: %d experts, %d edits", self.adapter_dir, self.editor.num_experts,
                                    len(self.editor.edits))
                    seen = now
                except Exception as err:  # a half-copied or foreign file: keep serving what we have
                    logger.warning("not reloading %s: %s", self.adapter_dir, err)

        self._follower = threading.Thread(target=loop, name="lemoe-follow", daemon=True)
        self._follower.start()

    def close(self) -> None:
        self._stop_following.set()
        if self._follower is not None:
            self._follower.join(timeout=5)


def stream_pieces(streamer: Any) -> Iterator[str]:
    """Text pieces from a transformers TextIteratorStreamer, skipping empty ones."""
    for piece in streamer:
        if piece:
            yield piece
