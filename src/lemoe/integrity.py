"""Digests and sanity checks of adapter tensors and metadata: a flipped byte is refused, not served.

safetensors checks the header's structure, not the data: a disk or a copy that changes bytes inside a
tensor gives a file that loads and answers garbage. Every save therefore stores a SHA-256 digest of each
tensor (dtype, shape and bytes) and of the state JSON in the file's metadata; every load recomputes them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

import torch


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (device and strides do not matter)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}|{tuple(tensor.shape)}|".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in sorted(tensors.items())}


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def digest_mismatch(tensors: Mapping[str, torch.Tensor], digests: Mapping[str, Any]) -> str | None:
    """What differs between tensors and their stored digests (None when all match)."""
    missing, extra = sorted(digests.keys() - tensors.keys()), sorted(tensors.keys() - digests.keys())
    if missing:
        return f"tensor {missing[0]!r} is listed in the digests but missing from the file"
    if extra:
        return f"tensor {extra[0]!r} has no stored digest"
    for name in sorted(tensors):
        if tensor_digest(tensors[name]) != digests[name]:
            return f"tensor {name!r} does not match its stored digest (its bytes changed after it was saved)"
    return None


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
