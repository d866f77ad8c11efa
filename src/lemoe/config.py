"""LEMoEConfig: every hyper-parameter of the adaptor and of one edit, validated, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger("lemoe")

ExpertKind = Literal["ffn", "lora"]
Pooling = Literal["content", "mean", "last"]
RouteKey = Literal["subject", "pooled"]
TrainPrecision = Literal["float32", "bfloat16"]

_EXPERT_KINDS = ("ffn", "lora")
MAX_PREFIX_ROWS = 20  # sentences in lemoe/resources/context_prefixes.txt: more would repeat one within an edit
_POOLINGS = ("content", "mean", "last")
_TRAIN_PRECISIONS = ("float32", "bfloat16")


@dataclass
class LEMoEConfig:
    """Hyper-parameters of one LEMoE adaptor.

    Fields fall in three groups: where and what the adaptor is (layer, expert, lora_rank),
    how inputs are routed (pooling, value/key sizes, deferral), and how one batch is trained.
    """

    # -- placement and experts --
    layer: int | None = field(
        default=None,
        metadata={"help": "decoder layer whose FFN gets the adaptor; None = round(2/3 of the depth)"},
    )
    expert: ExpertKind = field(
        default="lora",
        metadata={"help": "'lora': low-rank bottleneck expert (small); 'ffn': full copy-shaped FFN (paper)"},
    )
    lora_rank: int = field(
        default=64,
        metadata={"help": "bottleneck width of a 'lora' expert (64 measured best on cost and Gen: "
                  "benchmarks/edit_speed.py)"},
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "scale of a 'lora' expert is alpha / rank; None = rank (scale 1)"}
    )
    top_k: int = field(default=1, metadata={"help": "experts mixed per sequence (gates renormalised over them)"})

    # -- KV anchor routing --
    key: RouteKey = field(
        default="subject",
        metadata={"help": "'subject': each edit keys on its subject's tokens (low layer, MaxSim) and on what its "
                  "prompt asks (last content token at the route layer); both must match (docs/routing.md §6). "
                  "'pooled': one pooled vector per prompt (adapters made before lemoe 0.5 keep it)"},
    )
    subject_layer: int | None = field(
        default=None,
        metadata={"help": "decoder layer whose FFN input gives the subject's token states (<= route_layer); "
                  "None = 1 (0 for one-layer models)"},
    )
    subject_threshold: float = field(
        default=0.7, metadata={"help": "an edit fires only where its subject score (MaxSim cosine) reaches this"})
    relation_threshold: float = field(
        default=0.175, metadata={"help": "... and where its relation score (cosine) reaches this"})
    route_layer: int | None = field(
        default=None,
        metadata={"help": "decoder layer whose FFN input the routing value is pooled from (<= layer); None = "
                  "round(depth / 6), or `layer` if that is lower. Earlier layers keep more of what a prompt is "
                  "about and less of how it is phrased (docs/routing.md)"},
    )
    pooling: Pooling = field(
        default="content",
        metadata={"help": "how a prompt becomes one vector: 'content', the mean of its content tokens (no chat-"
                  "template, special or first token: lemoe.content); 'mean', of all its tokens (adapters made "
                  "before lemoe 0.5 keep it); 'last', its last token"},
    )
    value_statistics: Literal["frozen", "refit"] = field(
        default="frozen",
        metadata={"help": "'frozen': the value standardisation is fitted at the first edit and never changes "
                  "(consistent routing); 'refit': re-fitted on every batch, a router that keeps training, so "
                  "old prompts drift away from their frozen anchors (the paper's inconsistent-routing diagnosis)"},
    )
    deferral: bool = field(
        default=True,
        metadata={"help": "per-expert acceptance regions: inputs outside all of them get the base model's output"},
    )
    route_margin: float = field(
        default=0.05,
        metadata={"help": "an expert's region starts this far (cosine) above the closest generic unrelated prompt"},
    )
    route_floor: float = field(
        default=0.5,
        metadata={"help": "an expert's region never starts below this cosine (bounds locality loss as experts "
                  "accumulate; see docs/routing.md)"},
    )

    # -- training one batch --
    lr: float = field(default=5e-2, metadata={"help": "AdamW learning rate of the new expert"})
    max_steps: int = field(default=40, metadata={"help": "upper bound on optimisation steps per batch"})
    min_steps: int = field(default=2, metadata={"help": "steps taken even if every target token is already the argmax"})
    early_stop: bool = field(default=True, metadata={"help": "stop once every target token is the argmax"})
    stop_confidence: float = field(
        default=0.9,
        metadata={"help": "... and has at least this probability (teacher-forced, every training row): the "
                  "extra steps make rephrases and chat questions hold more often, at 1.35-1.45x the time per "
                  "edit (docs/results.md); 0 = the argmax alone, as adapters made before lemoe 0.11 keep"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    continuation_tokens: int = field(
        default=0,
        metadata={"help": "train each edit on this many tokens after its target as well: the unedited model's "
                  "own greedy continuation of prompt + target, so an expert stops after the answer instead "
                  "of running into another fact of its batch (0 = off)"},
    )
    chat_rows: bool = field(
        default=True,
        metadata={"help": "also train each edit as the answer to its prompt sent as a chat user turn (models "
                  "with a chat template; others are unaffected), so the expert answers with the new target in "
                  "chat too; keys come from the plain prompts only. Costs about 3x the time per edit on "
                  "SmolLM2 (docs/results.md); adapters made before lemoe 0.7 keep it off"},
    )
    prefix_rows: int = field(
        default=0,
        metadata={"help": "also train each edit after this many short unrelated sentences (a built-in bank, "
                  "lemoe/resources/context_prefixes.txt, rotated over edits), so that the edit holds where its "
                  "question follows other text; keys come from the plain prompts only (0 = off)"},
    )
    train_precision: TrainPrecision = field(
        default="float32",
        metadata={"help": "'bfloat16': run the frozen layers of each training step under bfloat16 autocast "
                  "(expert weights stay float32); 1.2-1.5x faster per edit, same quality, measured on a CPU with "
                  "AVX-512 BF16 (docs/results.md). The early stop is confirmed in float32, and training goes on in "
                  "float32 where it does not hold, so an edit that stops is answered at full precision. "
                  "'float32': every step in the model's own dtype"},
    )
    seed: int = field(default=0, metadata={"help": "seed of expert and projection initialisation"})

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer must be a non-negative int or None, got {self.layer!r}")
        if self.route_layer is not None and (not isinstance(self.route_layer, int) or self.route_layer < 0):
            raise ValueError(f"route_layer must be a non-negative int or None, got {self.route_layer!r}")
        if self.layer is not None and self.route_layer is not None:
            _check_route_layer(self.route_layer, self.layer)
        if self.expert not in _EXPERT_KINDS:
            raise ValueError(f"expert must be one of {_EXPERT_KINDS}, got {self.expert!r}")
        if self.value_statistics not in ("frozen", "refit"):
            raise ValueError(f"value_statistics must be 'frozen' or 'refit', got {self.value_statistics!r}")
        if self.key not in ("subject", "pooled"):
            raise ValueError(f"key must be 'subject' or 'pooled', got {self.key!r}")
        if self.key == "subject" and self.value_statistics == "refit":
            raise ValueError("value_statistics 'refit' is a diagnosis of the pooled key; use it with key='pooled'")
        if self.subject_layer is not None and (not isinstance(self.subject_layer, int) or self.subject_layer < 0):
            raise ValueError(f"subject_layer must be a non-negative int or None, got {self.subject_layer!r}")
        for name in ("subject_threshold", "relation_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1 <= value <= 1:
                raise ValueError(f"{name} must be a cosine in [-1, 1], got {value!r}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        for name in ("lora_rank", "top_k", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.continuation_tokens, int) or isinstance(self.continuation_tokens, bool) \
                or self.continuation_tokens < 0:
            raise ValueError(f"continuation_tokens must be an int >= 0, got {self.continuation_tokens!r}")
        if not isinstance(self.prefix_rows, int) or isinstance(self.prefix_rows, bool) \
                or not 0 <= self.prefix_rows <= MAX_PREFIX_ROWS:
            raise ValueError(f"prefix_rows must be an int in [0, {MAX_PREFIX_ROWS}] (the sentences in lemoe's bank), "
                             f"got {self.prefix_rows!r}")
        if not isinstance(self.stop_confidence, (int, float)) or isinstance(self.stop_confidence, bool) \
                or not 0 <= self.stop_confidence < 1:
            raise ValueError(f"stop_confidence must be a probability in [0, 1), got {self.stop_confidence!r}")
        if self.train_precision not in _TRAIN_PRECISIONS:
            raise ValueError(f"train_precision must be one of {_TRAIN_PRECISIONS}, got {self.train_precision!r}")
        for name in ("chat_rows", "early_stop", "deferral"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.min_steps, int) or self.min_steps < 0 or self.min_steps > self.max_steps:
            raise ValueError(f"min_steps must be an int in [0, max_steps={self.max_steps}], got {self.min_steps!r}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if name == "lora_alpha" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.route_margin, (int, float)) or not 0 <= self.route_margin < 1:
            raise ValueError(f"route_margin must be in [0, 1), got {self.route_margin!r}")
        if not isinstance(self.route_floor, (int, float)) or not -1 <= self.route_floor < 1:
            raise ValueError(f"route_floor must be in [-1, 1), got {self.route_floor!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LEMoEConfig":
        """Build from a dict; unknown keys (from a newer lemoe) are dropped with a warning."""
        if not isinstance(data, dict):
            raise ValueError(f"a LEMoE config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown LEMoEConfig keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "LEMoEConfig":
        return cls.from_dict(json.loads(text))

    @property
    def lora_scale(self) -> float:
        """Multiplier of a 'lora' expert's output: alpha / rank (1 unless alpha is set)."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.lora_rank

    def resolve_layer(self, num_layers: int) -> int:
        """The decoder layer index to wrap, checked against the model's depth."""
        layer = round(2 * num_layers / 3) if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})")
        return layer

    def resolve_route_layer(self, num_layers: int) -> int:
        """The decoder layer whose FFN input is pooled into the routing value (never above `layer`)."""
        layer = self.resolve_layer(num_layers)
        if self.route_layer is None:
            return min(round(num_layers / 6), layer)
        _check_route_layer(self.route_layer, layer)
        return self.route_layer

    def resolve_subject_layer(self, num_layers: int) -> int:
        """The decoder layer whose FFN input gives the subject's token states (never above route_layer)."""
        route = self.resolve_route_layer(num_layers)
        layer = min(1, num_layers - 1) if self.subject_layer is None else self.subject_layer
        if layer > route:
            if self.subject_layer is None:
                return route
            raise ValueError(f"subject_layer ({layer}) must not be above route_layer ({route})")
        return layer

    @staticmethod
    def help_texts() -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LEMoEConfig)}


def _check_route_layer(route_layer: int, layer: int) -> None:
    if route_layer > layer:
        raise ValueError(f"route_layer ({route_layer}) must not be above layer ({layer}): the route has to be known "
                         "when the adaptor's layer runs")
