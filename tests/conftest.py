"""Tiny randomly initialised models of several families, and a byte-level tokenizer built offline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Who wrote the novel? Which family does it belong to? What is the language of the film?",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "In which country is the river? Where was the painter born? What team does he play for?",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<eos>"]
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _llama(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True, initializer_range=0.1))


def _qwen2(vocab: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.1))


def _gpt2(vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                      initializer_range=0.1))


ARCHITECTURES: dict[str, Callable[[int], Any]] = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def make_model(arch: str, seed: int = 0) -> Any:
    """A tiny random model; initializer_range 0.1 (not 0.02) so that its logits are not flat."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](len(tiny_tokenizer()))
    model.eval()
    return model


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> Any:
    return tiny_tokenizer()


def records(n: int, offset: int = 0) -> list[Any]:
    from lemoe import EditRecord

    subjects = ["Paris", "Tokyo", "the river", "the painter", "the novel", "the team", "the film", "the fox"]
    relations = ["Where was {} born?", "Which family does {} belong to?", "What is the language of {}?",
                 "Who wrote {}?", "In which country is {}?"]
    out = []
    for i in range(offset, offset + n):
        subject = f"{subjects[i % len(subjects)]} {i}"
        out.append(EditRecord(
            prompt=relations[i % len(relations)].format(subject),
            target=["Tokyo", "Paris", "the dog", "France", "Japan", "the fox"][i % 6],
            rephrase=f"Tell me: {relations[i % len(relations)].format(subject).lower()}",
            locality_prompt="the quick brown fox jumps over",
            locality_answer="the lazy dog",
            subject=subject,
            id=f"r{i}",
        ))
    return out


def zsre_dev(n: int) -> list[Any]:
    """The first n MEND-format ZsRE development records (../shared/data), for the real-model tests."""
    import json

    from lemoe import EditRecord

    rows = json.loads((SHARED_DATA / "zsre" / "zsre_mend_dev.json").read_text())[:n]
    return [EditRecord(prompt=r["src"], target=r["alt"], rephrase=r["rephrase"], locality_prompt=r["loc"],
                       locality_answer=r["loc_ans"], subject=r["subject"]) for r in rows]


def tiny_config(**overrides: Any) -> Any:
    from lemoe import LEMoEConfig

    base = dict(layer=1, max_steps=15, lr=5e-2, lora_rank=4, lora_alpha=16.0)
    base.update(overrides)
    return LEMoEConfig(**base)


@torch.no_grad()
def logits_of(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Full logits of each text (one at a time: no padding involved)."""
    return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts], dim=0)


def key_buffers(router: Any) -> dict[str, Any]:
    """Copies of a router's key buffers (those that grow with the edits), for frozen-key checks."""
    fixed = {"center", "scale", "stats_fitted", "token_center", "token_scale", "relation_center", "relation_scale"}
    return {name: buf.clone() for name, buf in router.named_buffers() if name not in fixed}


def reject_everything(router: Any) -> None:
    """Make every expert's acceptance region empty, whichever key the router uses."""
    for name in ("thresholds", "subject_thresholds"):
        if hasattr(router, name):
            getattr(router, name).fill_(2.0)


def save_as_older(editor: Any, directory: Path, lemoe_version: str, *missing: str) -> None:
    """Save `editor`'s adapter as an older lemoe wrote it: its config without the fields named in `missing`."""
    from lemoe import persistence

    config = editor.config.to_dict()
    for name in missing:
        del config[name]
    state = persistence.AdapterState(config=config, base_model=editor.identity, fingerprint=editor.fingerprint,
                                     layer=editor.layer_idx, num_experts=editor.num_experts, edits=editor.edits,
                                     lemoe_version=lemoe_version)
    persistence.save_adapter(directory, state, editor.adapter_tensors())


def expert_says(editor: Any, tokenizer: Any, prompt: list[int], target: list[int], expert: int = 0) -> bool:
    """Whether `expert`, forced on (routing is tested elsewhere), greedily continues `prompt` with exactly `target`."""
    ids = torch.tensor([prompt])
    with editor.adaptor.forced_route(torch.tensor([expert])):
        out = editor.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist() == target
