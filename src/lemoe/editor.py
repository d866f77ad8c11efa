"""LifelongEditor: attach a LEMoE adaptor to a model, edit batch by batch, save / resume / roll back / unload."""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from . import __version__
from .config import LEMoEConfig
from .content import ContentTokens, subject_positions
from .data import DataError, EditRecord
from .encoding import (TeacherForcedBatch, chat_prompt_ids, chat_reply_ids, checked_ids, checked_pair, encode_answer,
                       encode_id_pairs, max_context, pad_id, pad_sequences, prompt_batch, prompt_inputs)
from .integrity import non_finite
from .layer import LEMoELayer, install_route_tap, install_token_tap
from .locks import ReadWriteLock
from .metrics import greedy_from_ids
from .models import base_model_identity, decoder_layers, find_layout, fingerprints_match, weight_fingerprint
from .persistence import (WEIGHTS_NAME, AdapterError, AdapterState, check_expert_count, has_adapter,
                          lemoe_files_without_weights, load_adapter, repair_views, save_adapter)
from .provenance import cpu_model, native_bfloat16_cpu
from .router import AnchorFit, KVAnchorRouter, Route, pool_states
from .sequence_routing import SequenceRouting
from .subject_router import content_queries
from .training import capture_ffn_inputs, capture_layer_inputs, capture_route_inputs, train_expert

logger = logging.getLogger("lemoe")


@dataclass
class EditReport:
    """What one `edit` call did. `train_accuracy` is teacher-forced with the new expert forced on;
    `routed_to_own` says whether each prompt routes to the new expert on its own."""

    batch: int
    expert: int
    num_edits: int
    steps: int
    seconds: float
    final_loss: float
    train_accuracy: list[float]
    routed_to_own: list[bool]
    anchor: AnchorFit | None = None  # LEMoE only: the new expert's key and acceptance region

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def builtin_negatives() -> list[str]:
    """Generic prompts unrelated to any edit, written for lemoe: where no expert may fire."""
    text = resources.files("lemoe").joinpath("resources/negatives.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def check_adapter_matches(model: nn.Module, state: AdapterState, directory: str | Path) -> None:
    """Refuse an adapter made for another architecture, size or set of weights."""
    identity = base_model_identity(model)
    for key in ("architecture", "num_layers", "hidden_size", "vocab_size"):
        if state.base_model.get(key) != identity[key]:
            raise AdapterError(
                f"{directory}: adapter was made for {state.base_model.get('name_or_path')!r} "
                f"({key}={state.base_model.get(key)!r}), this model has {key}={identity[key]!r}"
            )
    layout = find_layout(model)
    layers = decoder_layers(model, layout)
    if not 0 <= state.layer < len(layers):
        raise AdapterError(f"{directory}: saved layer {state.layer} is out of range for this model")
    base_ffn = getattr(layers[state.layer], layout.mlp_attr)
    if not fingerprints_match(weight_fingerprint(getattr(base_ffn, "base_layer", base_ffn)), state.fingerprint):
        raise AdapterError(
            f"{directory}: adapter was made for other weights ({state.base_model.get('name_or_path')!r}); "
            f"the FFN weights of layer {state.layer} of this model differ"
        )


def checked_records(records: Sequence[EditRecord], method: str = "edit") -> list[EditRecord]:
    """The batch as a list; an empty batch or a non-EditRecord item is refused by name."""
    records = list(records)
    if not records:
        raise DataError(f"{method}() needs at least one EditRecord")
    for i, record in enumerate(records):
        if not isinstance(record, EditRecord):
            raise DataError(f"{method}(): item {i} is a {type(record).__name__}, not an EditRecord")
    return records


def check_edits_fit(tokenizer: Any, model: nn.Module, records: Sequence[EditRecord], places: Sequence[str],
                    config: LEMoEConfig | None = None) -> None:
    """Every row an edit trains (plain, and the chat and prefixed rows `config` asks for) fits the model's context
    and tokenises to something: checked for a whole file before the first batch trains; the error names the
    record's place."""
    config = config or LEMoEConfig(chat_rows=False)
    limit = max_context(model)
    for i, (record, where) in enumerate(zip(records, places, strict=True)):
        edit_rows(tokenizer, [record], [where], limit, config.chat_rows, prefixes_for(i, 1, config.prefix_rows))


@functools.cache
def context_prefixes() -> tuple[str, ...]:
    """Short unrelated sentences written for lemoe, put before an edit's prompt in `prefix_rows` training rows."""
    text = resources.files("lemoe").joinpath("resources/context_prefixes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def prefixes_for(first_index: int, count: int, per_edit: int) -> list[list[str]]:
    """The bank's sentences for edits first_index .. first_index + count - 1, `per_edit` each, rotated over the
    edit numbers (so a resumed stream trains an edit on the same sentences as an uninterrupted one)."""
    bank = context_prefixes()
    return [[bank[((first_index + i) * per_edit + j) % len(bank)] for j in range(per_edit)] for i in range(count)]


def encode_edits(tokenizer: Any, model: nn.Module, records: list[EditRecord], first_index: int,
                 continuations: Sequence[Sequence[int]] | None = None, chat: bool = False,
                 prefixes: Sequence[Sequence[str]] | None = None) -> TeacherForcedBatch:
    """The teacher-forced batch of an edit batch (rows: see `edit_rows`); a bad pair is named by its edit number
    and prompt. `continuations` (per edit) follow the answers of the plain rows only."""
    limit = max_context(model)
    labels = [f"edit {first_index + i} (prompt {r.prompt[:60]!r})" for i, r in enumerate(records)]
    pairs = edit_rows(tokenizer, records, labels, limit, chat, prefixes)
    if continuations is not None:
        continuations = [*continuations, *([[]] * (len(pairs) - len(records)))]
    return encode_id_pairs(pairs, pad_id(tokenizer), limit, continuations)


def edit_rows(tokenizer: Any, records: Sequence[EditRecord], labels: Sequence[str], limit: int | None, chat: bool,
              prefixes: Sequence[Sequence[str]] | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of every row an edit batch trains, checked (ValueError naming the label).

    In this order: the B plain prompts (keys are taken from these); with `chat`, each prompt sent as a chat
    user turn (the tokenizer's template with the generation prompt), answered by the target as the template
    writes an assistant's reply (no leading space; the end of turn after it, so that the chat answer stops
    there); with `prefixes` (per edit, a list of sentences), the prompt after each sentence."""
    pairs = [checked_pair(tokenizer, r.prompt, r.target, limit, label) for r, label in zip(records, labels)]
    if chat and getattr(tokenizer, "chat_template", None):
        for record, label in zip(records, labels):
            reply = chat_reply_ids(tokenizer, record.prompt, record.target)
            if reply is None:  # a template that rewrites the conversation: the target after the generation prompt
                prompt_ids = chat_prompt_ids(tokenizer, record.prompt) or []
                reply = prompt_ids, encode_answer(tokenizer, record.target)
            pairs.append(checked_ids(*reply, record.target, limit, f"{label}, as a chat turn"))
    for record, label, sentences in zip(records, labels, prefixes or []):
        for sentence in sentences:
            pairs.append(checked_pair(tokenizer, f"{sentence} {record.prompt}", record.target, limit,
                                      f"{label}, after the sentence {sentence[:40]!r}"))
    return pairs


class LifelongEditor:
    """Edits a causal LM in place through one LEMoE adaptor; one expert per `edit` batch.

    The model stays an ordinary HuggingFace model (`generate` works); `unload()` gives back the
    original FFN module, so the model is bit for bit what it was.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: LEMoEConfig | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or LEMoEConfig()
        self.layout = find_layout(model)
        self.layers = decoder_layers(model, self.layout)
        self.layer_idx = self.config.resolve_layer(len(self.layers))
        self.route_layer_idx = self.config.resolve_route_layer(len(self.layers))
        self.subject_layer_idx = self.config.resolve_subject_layer(len(self.layers))
        parent = self.layers[self.layer_idx]
        base_ffn = getattr(parent, self.layout.mlp_attr)
        if isinstance(base_ffn, LEMoELayer):
            raise ValueError(
                f"decoder layer {self.layer_idx} already carries a LEMoE adaptor; unload() the other editor first"
            )
        hidden = int(model.get_input_embeddings().weight.shape[1])
        if self.config.expert == "lora" and self.config.lora_rank > hidden:
            raise ValueError(f"lora_rank {self.config.lora_rank} exceeds the model's width {hidden}: a LoRA expert "
                             "of higher rank than the layer it adapts adds nothing")
        self.identity = base_model_identity(model)
        self.fingerprint = weight_fingerprint(base_ffn)
        self.adaptor = LEMoELayer(base_ffn, self.layout, hidden, self.config)
        setattr(parent, self.layout.mlp_attr, self.adaptor)
        self._lock = threading.RLock()  # one edit, rollback, reload, save or unload at a time
        # `generate` reads the experts from its routing decision to its last token (sequence_routing); adding,
        # showing or dropping an expert writes, briefly: an expert trains while generations go on
        self._experts = ReadWriteLock()
        self.sequence_routing = SequenceRouting(model, self._route_generate_prompts, self._experts.read)
        self.adaptor.sequence = self.sequence_routing
        self.adaptor.route_layer_idx = self.route_layer_idx
        self.adaptor.subject_layer_idx = self.subject_layer_idx if self.config.key == "subject" else self.route_layer_idx
        self._hooks = [install_route_tap(ffn, index, self.adaptor) for index, ffn in self.route_ffns.items()
                       if index < self.layer_idx]
        if self.config.pooling == "content" or self.config.key == "subject":
            self.adaptor.content = ContentTokens(tokenizer)
            self._hooks.append(install_token_tap(model.get_input_embeddings(), self.adaptor))
        self.edits: list[dict[str, Any]] = []  # record fields + batch + expert, in edit order
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._negatives: torch.Tensor | None = None
        self._negative_query: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._attached = True
        if self.config.train_precision == "bfloat16" and self.device.type == "cpu" and native_bfloat16_cpu() is False:
            logger.warning("train_precision 'bfloat16' on a CPU without bfloat16 units (%s): each training step will "
                           "be several times slower than in float32 (a bfloat16 matrix product ran 6-7x slower on "
                           "such a CPU, docs/results.md); use 'float32' here", cpu_model())

    # ------------------------------------------------------------------ properties

    @property
    def num_experts(self) -> int:
        return self.adaptor.num_experts

    @property
    def route_ffn(self) -> nn.Module:
        """The FFN module whose input is pooled into routing values (the adaptor itself at layer L)."""
        return getattr(self.layers[self.route_layer_idx], self.layout.mlp_attr)

    @property
    def route_ffns(self) -> dict[int, nn.Module]:
        """Every FFN whose input routing reads, by layer index (route layer; subject layer for key 'subject')."""
        subject = self.adaptor.subject_layer_idx
        indices = {self.route_layer_idx, self.route_layer_idx if subject is None else subject}
        return {i: getattr(self.layers[i], self.layout.mlp_attr) for i in sorted(indices)}

    @property
    def device(self) -> torch.device:
        return next(self.adaptor.base_layer.parameters()).device

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ editing

    def edit(self, records: Sequence[EditRecord]) -> EditReport:
        """Train one new expert on this batch of edits; every earlier expert and key stays untouched.

        All or nothing: when training or the save into `output_dir` fails, the editor is left exactly as
        before the call (so a retry adds one expert, not two)."""
        with self._lock:
            return self._edit(records)

    def _edit(self, records: Sequence[EditRecord]) -> EditReport:
        self._check_attached()
        records = checked_records(records)
        started = time.perf_counter()
        continuations = self._continuations(records) if self.config.continuation_tokens else None
        prefixes = prefixes_for(len(self.edits), len(records), self.config.prefix_rows)  # [] per edit when off
        batch = encode_edits(self.tokenizer, self.model, records, len(self.edits), continuations,
                             chat=self.config.chat_rows, prefixes=prefixes).to(self.input_device)
        # 1. frozen pass up to layer L: the layer input (replayed while training) and the routing states
        layer_input, states = capture_layer_inputs(self.model, self.layers, self.layer_idx, self.adaptor,
                                                   self.route_ffns, batch)
        plain = len(records)  # keys come from the plain prompts (rows after them: chat turns, training only)
        states = {layer: hidden[:plain] for layer, hidden in states.items()}
        mask = self.adaptor.routing_mask(batch.prompt_mask, batch.input_ids)[:plain]
        # 2. a new zero expert, hidden from every routing decision until it is trained and saved, then its
        #    key (frozen) and acceptance region
        with self._experts.write:
            expert_id = self.adaptor.add_expert(self.adaptor.new_expert())
            self.adaptor.visible_experts = expert_id
        try:
            with self._experts.write:
                anchor = self._add_key(expert_id, records, batch, states, mask)
            # 3. the expert itself, on layers L..N only; generation goes on meanwhile (with the old experts)
            result = train_expert(self.model, self.layers, self.layer_idx, self.adaptor, expert_id, batch,
                                  layer_input, self.config)
            diverged = non_finite(dict(self.adaptor.experts[expert_id].state_dict()))
            if diverged:
                raise ValueError(f"training diverged: the new expert's {diverged[0]!r} holds NaN or infinity "
                                 f"(learning rate {self.config.lr:g}); nothing was added")
            for record in records:
                self.edits.append({**record.to_dict(probes=False), "batch": expert_id, "expert": expert_id})
            if self.output_dir is not None:
                self.save(self.output_dir)  # the saved adapter is the truth: nothing unsaved is ever served
        except BaseException:
            with self._experts.write:  # an interrupted batch leaves no half-made expert behind
                self.adaptor.truncate(expert_id)
                self.adaptor.visible_experts = None
                del self.edits[len(self.edits) - sum(e["expert"] == expert_id for e in self.edits):]
            raise
        with self._experts.write:
            self.adaptor.visible_experts = None  # 4. generations that start from now on may use it
        routed = self.adaptor.decide(states, mask).top1()
        batch_index = expert_id
        report = EditReport(
            batch=batch_index, expert=expert_id, num_edits=len(records), steps=result.steps,
            seconds=time.perf_counter() - started, final_loss=result.final_loss,
            train_accuracy=result.token_accuracy, routed_to_own=[r == expert_id for r in routed], anchor=anchor,
        )
        logger.info("batch %d: %d edits, %d steps, %.2fs, loss %.4f", batch_index, len(records), result.steps,
                    report.seconds, result.final_loss)
        return report

    def edit_stream(
        self,
        records: Sequence[EditRecord],
        batch_size: int,
        on_batch: Callable[[EditReport], None] | None = None,
    ) -> list[EditReport]:
        """Edit `records` in consecutive batches; batches this editor already holds are skipped (resume)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        done = self._verify_prefix(records, batch_size)
        if done:
            logger.info("resuming: %d of %d edits already applied", done, len(records))
        reports = []
        for start in range(done, len(records), batch_size):
            report = self.edit(records[start : start + batch_size])
            reports.append(report)
            if on_batch is not None:
                on_batch(report)
        return reports

    def _verify_prefix(self, records: Sequence[EditRecord], batch_size: int) -> int:
        """How many leading records are already applied; an error if the stored edits differ."""
        for i, stored in enumerate(self.edits):
            if i >= len(records):
                raise ValueError(f"this adapter holds {len(self.edits)} edits, more than the {len(records)} given")
            record = records[i]
            if stored["prompt"] != record.prompt or stored["target"] != record.target:
                raise ValueError(
                    f"cannot resume: stored edit {i} ({stored['prompt'][:60]!r} -> {stored['target']!r}) differs "
                    f"from record {i} of the data ({record.prompt[:60]!r} -> {record.target!r})"
                )
            if stored["batch"] != i // batch_size:
                raise ValueError(
                    f"cannot resume: the adapter was edited with another batch size (edit {i} is in batch "
                    f"{stored['batch']}, batch size {batch_size} puts it in batch {i // batch_size})"
                )
        return len(self.edits)

    def _continuations(self, records: Sequence[EditRecord]) -> list[list[int]]:
        """What the unedited model says after each prompt + target (greedy): the expert learns to hand
        the text back to it once the answer is given."""
        encoded = encode_edits(self.tokenizer, self.model, list(records), len(self.edits))
        sequences = [ids[: int(mask.sum())].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask)]
        with self.disabled():
            return greedy_from_ids(self.model, self.tokenizer, sequences,
                                   [self.config.continuation_tokens] * len(sequences))

    def _add_key(self, expert_id: int, records: Sequence[EditRecord], batch: TeacherForcedBatch,
                 states: dict[int, torch.Tensor], mask: torch.Tensor) -> AnchorFit:
        """Freeze the new expert's key; the first batch also fixes the value statistics."""
        router = self.adaptor.router
        first = not bool(router.stats_fitted)
        if isinstance(router, KVAnchorRouter):
            pooled = router.pool(states[self.route_layer_idx], mask).to(self.device)  # (B, d)
            negatives = self._negative_vectors()
            if first:
                router.fit_statistics(torch.cat([pooled, negatives], dim=0))
            elif self.config.value_statistics == "refit":  # diagnosis mode: the value function keeps moving
                router.fit_statistics(torch.cat([router.anchor_pooled, pooled, negatives], dim=0))
            return router.add_expert_key(pooled, negatives)
        tokens, relations = self._queries(states, mask)
        negative_tokens, negative_relations = self._negative_queries()
        if first:
            router.fit_statistics(torch.cat([*tokens, *negative_tokens]), torch.cat([relations, negative_relations]))
        subject_tokens = []
        for row, record in enumerate(records):
            positions = subject_positions(self.tokenizer, record.prompt, record.subject)
            content = mask[row].nonzero().flatten().tolist()
            chosen = [p for p in positions if p in content] if positions else []
            subject_tokens.append(states[self.subject_layer_idx][row, chosen or content])
            if not chosen:
                logger.info("edit %r: subject %r not found in the prompt; keying on every content token",
                            record.prompt[:60], record.subject)
        return router.add_expert_key(expert_id, subject_tokens, relations, negative_tokens, negative_relations)

    def _queries(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per row: the subject layer's content-token states (m, d) and the route layer's last content state."""
        tokens, relations = content_queries(states[self.subject_layer_idx], states[self.route_layer_idx], mask)
        return [t.to(self.device) for t in tokens], relations.to(self.device)

    def _negative_queries(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._negative_query is None:
            batch = prompt_batch(self.tokenizer, builtin_negatives()).to(self.input_device)
            states = capture_ffn_inputs(self.model, self.route_ffns, batch)
            self._negative_query = self._queries(states, self.adaptor.routing_mask(batch.attention_mask,
                                                                                   batch.input_ids))
        return self._negative_query

    def _negative_vectors(self) -> torch.Tensor:
        if self._negatives is None:
            self._negatives = self.pooled_prompts(builtin_negatives())
        return self._negatives

    # ------------------------------------------------------------------ routing

    @torch.no_grad()
    def pooled_prompts(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(n, d) routing vectors of prompts, from a frozen pass that stops at the route layer's FFN."""
        if not prompts:
            return torch.zeros(0, self.adaptor.hidden_size, device=self.device)
        vectors = []
        for start in range(0, len(prompts), batch_size):
            batch = prompt_batch(self.tokenizer, prompts[start : start + batch_size]).to(self.input_device)
            states = capture_route_inputs(self.model, self.route_ffn, batch)
            mask = self.adaptor.routing_mask(batch.attention_mask, batch.input_ids)
            vectors.append(pool_states(states, mask, last=self.config.pooling == "last").to(self.device))
        return torch.cat(vectors, dim=0)

    @torch.no_grad()
    def _route_generate_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Route | None:
        """The route of every prompt given to `generate`, decided once at its entry (sequence_routing.py)."""
        if self.adaptor.off:
            return None
        inputs = prompt_inputs(input_ids.to(self.input_device), attention_mask.to(self.input_device))
        states = capture_ffn_inputs(self.model, self.route_ffns, inputs)
        return self.adaptor.route_prompts(states, inputs.attention_mask, inputs.input_ids)

    @torch.no_grad()
    def route(self, prompts: Sequence[str], batch_size: int = 32) -> list[int | None]:
        """The expert each prompt is routed to, or None where every expert defers."""
        self._check_attached()
        routed: list[int | None] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompt_batch(self.tokenizer, prompts[start : start + batch_size]).to(self.input_device)
            states = capture_ffn_inputs(self.model, self.route_ffns, batch)
            routed += self.adaptor.decide(states, self.adaptor.routing_mask(batch.attention_mask,
                                                                           batch.input_ids)).top1()
        return routed

    @torch.no_grad()
    def route_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> list[int | None]:
        """The expert each token-id prompt is routed to when given to `generate` (left-padded, decided at
        entry exactly as generation decides it), or None where every expert defers."""
        self._check_attached()
        routed: list[int | None] = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_sequences(sequences[start : start + batch_size], pad_id(self.tokenizer), left_pad=True)
            route = self._route_generate_prompts(ids, mask)
            routed += route.top1() if route is not None else [None] * len(ids)
        return routed

    def snapshot(self) -> ContextManager[None]:
        """Inside the block the set of experts does not change (an edit may train, but commits, rollbacks and
        reloads wait): a server decides a request's expert and generates its answer under one snapshot."""
        return self._experts.read

    def reload(self, directory: str | Path) -> bool:
        """Replace every expert by those saved in `directory` (a follower of another process's adapter);
        False when nothing changed. Refused, keeping the current experts, if it has another config or model."""
        state, tensors = load_adapter(directory)
        if state.method != "lemoe":
            raise AdapterError(f"{directory}: holds {state.method!r} state, not a LEMoE adapter")
        check_adapter_matches(self.model, state, directory)
        if LEMoEConfig.from_dict(state.config).to_dict() != self.config.to_dict() or state.layer != self.layer_idx:
            raise AdapterError(f"{directory}: the adapter now has another config or layer; restart to serve it")
        with self._lock, self._experts.write:
            if state.edits == self.edits and state.num_experts == self.num_experts:
                return False
            router = self.adaptor.router
            kept_buffers, kept_experts, kept_edits = dict(router.named_buffers()), list(self.adaptor.experts), self.edits
            self.adaptor.truncate(0)
            try:
                self._restore(state, tensors)
            except BaseException:  # keep serving what was there
                self.adaptor.truncate(0)
                for expert in kept_experts:
                    self.adaptor.add_expert(expert)
                for name, tensor in kept_buffers.items():
                    setattr(router, name, tensor)
                self.edits = kept_edits
                raise
        return True

    def prompt_positions(self, mask: torch.Tensor) -> ContextManager[None]:
        """Inside the block, each row is routed on the positions where `mask` is 1 (scoring prompt + answer)."""
        return self.adaptor.prompt_positions(mask)

    def routing_consistency(self) -> float:
        """Share of stored edits whose prompt routes to the expert trained on it, through the current
        value function (with frozen statistics the same values as the anchors themselves)."""
        router = self.adaptor.router
        if not isinstance(router, KVAnchorRouter):
            return router.consistency()
        if router.anchors.shape[0] == 0:
            return float("nan")
        routed = self.adaptor.route(router.anchor_pooled).experts[:, 0]
        return float((routed == router.anchor_experts).float().mean())

    # ------------------------------------------------------------------ state

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the model behaves exactly as the base model (in this thread; other threads keep
        their experts)."""
        state = self.adaptor.routing  # this thread only: other threads' generations keep their experts
        previous = state.base_only
        state.base_only = True
        try:
            yield
        finally:
            state.base_only = previous

    def rollback(self, batches: int = 1) -> int:
        """Drop the newest `batches` experts and their edits; returns the number of edits removed. Waits for
        the generations in flight: no expert vanishes mid-answer."""
        with self._lock, self._experts.write:
            return self._rollback(batches)

    def _rollback(self, batches: int) -> int:
        self._check_attached()
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"batches must be a non-negative int, got {batches!r}")
        if batches > self.num_experts:
            raise ValueError(f"cannot roll back {batches} batches: the adapter holds {self.num_experts}")
        keep = self.num_experts - batches
        router = self.adaptor.router
        saved_buffers = dict(router.named_buffers())  # truncate() replaces them: the old tensors stay intact
        dropped, edits = list(self.adaptor.experts[keep:]), self.edits
        self.adaptor.truncate(keep)
        self.edits = [e for e in edits if e["expert"] < keep]
        if self.output_dir is not None:
            try:
                self.save(self.output_dir)
            except BaseException:  # a failed save leaves memory as it was, like the disk
                for expert in dropped:
                    self.adaptor.add_expert(expert)
                for name, tensor in saved_buffers.items():
                    setattr(router, name, tensor)
                self.edits = edits
                raise
        return len(edits) - len(self.edits)

    def unload(self) -> nn.Module:
        """Put the original FFN back and remove every trace of the adaptor; returns the model."""
        with self._lock, self._experts.write:
            return self._unload()

    def _unload(self) -> nn.Module:
        if self._attached:
            setattr(self.layers[self.layer_idx], self.layout.mlp_attr, self.adaptor.base_layer)
            for hook in self._hooks:
                hook.remove()
            self.sequence_routing.remove()
            self.adaptor.sequence = None
            self.adaptor.tapped_layers.clear()
            self._attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this editor was unloaded; create a new LifelongEditor to edit again")

    # ------------------------------------------------------------------ persistence

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.adaptor.state_dict().items() if not k.startswith("base_layer.")}

    def save(self, directory: str | Path) -> None:
        """Write the adapter directory (atomic: a kill mid-save leaves the previous save intact)."""
        with self._lock:
            state = AdapterState(
                config=self.config.to_dict(), base_model=self.identity, fingerprint=self.fingerprint,
                layer=self.layer_idx, num_experts=self.num_experts, edits=self.edits, lemoe_version=__version__,
            )
            save_adapter(directory, state, self.adapter_tensors())

    @classmethod
    def load(
        cls, model: nn.Module, tokenizer: Any, directory: str | Path, output_dir: str | Path | None = None
    ) -> "LifelongEditor":
        """Attach a saved adapter to `model`; refused if it was made for another model. Reading never writes;
        when `output_dir` is the adapter itself (resuming), stale side files from a killed save are repaired."""
        state, tensors = load_adapter(directory)
        if state.method != "lemoe":
            raise AdapterError(f"{directory}: holds the state of the {state.method!r} baseline, not a LEMoE adapter; "
                               "load it with lemoe.baselines.load_editor")
        check_adapter_matches(model, state, directory)
        try:
            config = LEMoEConfig.from_dict(state.config)
            if config.resolve_layer(len(decoder_layers(model, find_layout(model)))) != state.layer:
                raise AdapterError(f"{directory}: config layer does not match the saved layer {state.layer}")
            editor = cls(model, tokenizer, config, output_dir=output_dir)
        except (TypeError, ValueError) as err:
            if isinstance(err, AdapterError):
                raise
            raise AdapterError(f"{directory}: the saved config does not fit this model: {err}") from None
        try:
            editor._restore(state, tensors)
        except Exception as err:
            editor.unload()
            if isinstance(err, AdapterError):
                raise
            raise AdapterError(f"{directory}: the saved adapter cannot be restored: {err}") from err
        if output_dir is not None and Path(output_dir).resolve() == Path(directory).resolve():
            repair_views(directory, state)
        return editor

    def _restore(self, state: AdapterState, tensors: dict[str, torch.Tensor]) -> None:
        check_expert_count(tensors, state.num_experts, "adapter")  # before allocating any expert
        for _ in range(state.num_experts):
            self.adaptor.add_expert(self.adaptor.new_expert())
        router = self.adaptor.router
        for name, _ in list(router.named_buffers()):  # key buffers grow with the edits: take the saved sizes
            key = f"router.{name}"
            if key not in tensors:
                raise AdapterError(f"adapter tensors lack {key!r}")
            setattr(router, name, torch.empty_like(tensors[key], device=self.device))
        expected = self.adapter_tensors()  # built once: it walks every expert
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or unexpected:
            raise AdapterError(
                f"adapter tensors do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in tensors.items():
            if expected[name].shape != tensor.shape:
                raise AdapterError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                   f"{tuple(expected[name].shape)}")
        self.adaptor.load_state_dict({**self.adaptor.base_layer.state_dict(prefix="base_layer."), **tensors})
        if router.num_experts != state.num_experts or int(router.anchor_experts.shape[0]) != len(state.edits):
            raise AdapterError("adapter is inconsistent: expert or edit counts differ between tensors and metadata")
        self.edits = [dict(e) for e in state.edits]

    @classmethod
    def open(
        cls, model: nn.Module, tokenizer: Any, output_dir: str | Path, config: LEMoEConfig | None = None,
        overwrite: bool = False,
    ) -> "LifelongEditor":
        """An editor that saves into `output_dir` after every batch, resuming what is already there.

        A directory holding lemoe files but no weights file (a partial copy) is refused unless
        `overwrite`: starting afresh there would replace its edit log."""
        partial = lemoe_files_without_weights(output_dir)
        if partial and not overwrite:
            raise AdapterError(f"{output_dir}: holds {', '.join(partial)} but no {WEIGHTS_NAME} (a partial copy?); "
                               "restore the weights file, or pass overwrite=True (CLI: --overwrite) to start a new "
                               "adapter there")
        if has_adapter(output_dir):
            editor = cls.load(model, tokenizer, output_dir, output_dir=output_dir)
            if config is not None and config.to_dict() != editor.config.to_dict():
                editor.unload()
                raise ValueError(
                    f"{output_dir} holds an adapter with another config; resume without overriding the config "
                    "or choose a new output directory"
                )
            return editor
        return cls(model, tokenizer, config, output_dir=output_dir)
