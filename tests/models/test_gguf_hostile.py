"""Hostile GGUF files (issue 17, point 6): every one is a GGUFError "invalid model file", quickly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ollamad.models.catalog import Catalog
from ollamad.models.ggufmeta import GGUFError, read_gguf
from ollamad.models.testmodels import write_metadata_only


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf(kvs: list[bytes], n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def nested(depth: int) -> bytes:
    """One key whose value is an array of an array ... ``depth`` deep (the probe used 20,000)."""
    value = struct.pack("<I", 9) + b"".join(struct.pack("<IQ", 9, 1) for _ in range(depth)) + struct.pack("<IQ", 4, 0)
    return _gguf([_string(b"bad.nested") + value])


HOSTILE = {
    "nested 20000 deep": nested(20_000),
    "array count past the end": _gguf([_string(b"a") + struct.pack("<IIQ", 9, 8, 1 << 62)]),
    "string array count past the end": _gguf([_string(b"a") + struct.pack("<IIQ", 9, 8, 1 << 40) + _string(b"x")]),
    "string length past the end": _gguf([_string(b"a") + struct.pack("<IQ", 8, 1 << 30)]),
    "key of 1 MiB": _gguf([_string(b"k" * (1 << 20)) + struct.pack("<II", 4, 1)]),
    "unknown value type": _gguf([_string(b"a") + struct.pack("<I", 77)]),
    "truncated": _gguf([_string(b"a")])[:-3],
    "bad magic": b"GGUX" + b"\0" * 64,
    "empty": b"",
    "tensor past the end": _gguf([], n_tensors=1) + _string(b"t") + struct.pack("<IQIQ", 1, 1 << 40, 0, 0),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_are_invalid_model_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(GGUFError, match="invalid model file"):
        read_gguf(path)


def test_shallow_arrays_still_read(tmp_path: Path) -> None:
    path = write_metadata_only(tmp_path / "ok.gguf", "llama", {"llama.context_length": 8, "x.list": [1, 2, 3]})
    assert read_gguf(path).metadata["x.list"] == [1, 2, 3]
    path.write_bytes(nested(3))
    assert read_gguf(path).metadata["bad.nested"] == [[[[]]]]


def test_catalog_logs_a_bad_model_once_and_clamps_absurd_context(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.gguf").write_bytes(nested(20_000))
    write_metadata_only(tmp_path / "huge.gguf", "llama", {"llama.context_length": (1 << 32) - 1})
    catalog = Catalog(tmp_path)
    catalog.scan()
    bad = catalog.resolve("bad")
    assert bad is not None
    for _ in range(3):
        with pytest.raises(GGUFError, match="invalid model file"):
            catalog.facts(bad)
    assert capsys.readouterr().out.count("skipping a model") == 1
    huge = catalog.resolve("huge")
    assert huge is not None and catalog.facts(huge).train_ctx == 1 << 24
