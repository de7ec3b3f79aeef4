"""Read a GGUF file's metadata and tensor table without loading the tensors.

Large arrays (a 150k-token vocabulary) are skipped, not parsed: only their length is kept.
The file may be hostile (a pulled or uploaded blob): nesting depth, counts and string lengths
are bounded, and every way of failing is a GGUFError saying "invalid model file".
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
KEEP_ARRAY_MAX = 64  # arrays longer than this are skipped (tokens, merges, scores)
MAX_DEPTH = 4  # arrays of arrays nested deeper than this are refused (real files use 1)
MAX_KEY = 1 << 16  # bytes in a metadata key or tensor name
MAX_STRING = 1 << 26  # bytes in one metadata string (chat templates are a few KiB)


class GGUFError(ValueError):
    """The file is not a readable GGUF file."""


@dataclass(frozen=True)
class SkippedArray:
    """Stands in for an array too long to be worth reading."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type)]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {self.name} has unknown type {self.type}") from None
        return self.n_elements * size // block


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch(self, key: str, default: Any = None) -> Any:
        """``<architecture>.<key>`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, n: int, what: str) -> None:
        """Refuse a declared length or count the rest of the file cannot hold."""
        if n > self.left():
            raise GGUFError(f"{what} runs past the end of the file")

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError("file is truncated")
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.u64()
        if n > limit:
            raise GGUFError("string length is implausible")
        self.need(n, "a string")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        self.need(n, "a string")
        self.f.seek(n, 1)

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings, walking 1 MiB buffers (a 262k-token vocabulary in
        a tenth of the time a read and a seek per string take: /api/tags and loads wait on it)."""
        start = self.f.tell()
        unpack = struct.Struct("<Q").unpack_from
        buf, base, pos = b"", 0, 0  # buf holds the file from start + base; pos: offset from start
        for _ in range(count):
            if pos + 8 > base + len(buf):
                self.f.seek(start + pos)
                buf, base = self.f.read(1 << 20), pos
                if len(buf) < 8:
                    raise GGUFError("file is truncated")
            pos += 8 + unpack(buf, pos - base)[0]
            if start + pos > self.size:
                raise GGUFError("a string runs past the end of the file")
        self.f.seek(start + pos)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_DEPTH:
                raise GGUFError(f"arrays nested more than {MAX_DEPTH} deep")
            itype, count = self.u32(), self.u64()
            self.need(count * _least_size(itype), "an array")
            if count > KEEP_ARRAY_MAX:
                self.skip_array(itype, count, depth + 1)
                return SkippedArray(count)
            return [self.value(itype, depth + 1) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {vtype}")

    def skip_array(self, itype: int, count: int, depth: int) -> None:
        if itype in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
        elif itype == _STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(itype, depth)


def _least_size(vtype: int) -> int:
    """Fewest bytes one value of ``vtype`` takes in the file (a count check needs no reading)."""
    if vtype in _SCALARS:
        return struct.calcsize(_SCALARS[vtype])
    if vtype == _STRING:
        return 8
    if vtype == _ARRAY:
        return 12
    raise GGUFError(f"unknown metadata value type {vtype}")


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read metadata and tensor infos from ``path``; GGUFError ("invalid model file") on a bad file.

    OSError (no such file, no permission) is left to the caller: the file is not bad, it is missing.
    """
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return _read(_Reader(f, os.fstat(f.fileno()).st_size))
    except GGUFError as e:
        raise GGUFError(f"invalid model file {Path(path).name}: {e}") from None
    except (struct.error, ValueError, OverflowError, MemoryError, RecursionError) as e:
        raise GGUFError(f"invalid model file {Path(path).name}: {type(e).__name__}") from None


def _read(r: _Reader) -> GGUFInfo:
    if r.read(4) != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = r.u32()
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError("header counts are implausible")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string(MAX_KEY)
        meta[key] = r.value(r.u32())
    tensors = []
    for _ in range(n_tensors):
        name = r.string(MAX_KEY)
        n_dims = r.u32()
        if n_dims > 8:
            raise GGUFError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(r.u64() for _ in range(n_dims))
        ttype = r.u32()
        r.u64()  # offset
        tensors.append(TensorInfo(name, shape, ttype))
    info = GGUFInfo(version, meta, tuple(tensors))
    if info.tensors and info.tensor_bytes > r.left():
        raise GGUFError("file is truncated (tensor data missing)")
    return info
