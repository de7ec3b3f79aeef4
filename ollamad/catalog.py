"""Which models exist: a folder of *.gguf files (Ollama's store joins in later).

``tiny.gguf`` is the model ``tiny`` (also ``tiny:latest``); ``tiny.mmproj.gguf`` beside it
is its vision projector. Names are looked up in a table, never turned into paths, so a
request cannot name a file outside the folder.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ollamad.ggufmeta import read_gguf
from ollamad.modelfacts import ModelFacts, facts_from_gguf
from ollamad.plan import ModelDefaults

PROJECTOR_SUFFIX = ".mmproj.gguf"
_PART = r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,127}"
_NAME = re.compile(rf"^{_PART}(/{_PART}){{0,2}}(:[a-zA-Z0-9_][a-zA-Z0-9_.\-]{{0,127}})?$")
DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "library/")


class InvalidName(ValueError):
    pass


def normalize(name: str) -> str:
    """The catalog key for a model name: lower case, registry prefix dropped, tag added."""
    n = name.strip().lower()
    for prefix in DEFAULT_PREFIXES:
        if n.startswith(prefix):
            n = n[len(prefix) :]
    if not n or not _NAME.match(n) or ".." in n:
        raise InvalidName(f"invalid model name {name!r}")
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


@dataclass(frozen=True)
class Model:
    name: str  # catalog key, e.g. "tiny:latest"
    path: Path
    size: int
    modified: float
    projector: Path | None = None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    digest: str | None = None  # known up front for store models; lazily hashed for files


class Catalog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._models: dict[str, Model] = {}
        self._facts: dict[tuple[Path, int, float], ModelFacts] = {}
        self._digests: dict[tuple[Path, int, float], str] = {}
        self._lock = threading.Lock()

    def scan(self) -> dict[str, Model]:
        """Re-read the folder; returns the new table (old entries are replaced)."""
        models: dict[str, Model] = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*.gguf")):
                if path.name.endswith(PROJECTOR_SUFFIX) or not path.is_file():
                    continue
                try:
                    key = normalize(path.stem)
                except InvalidName:
                    continue
                proj = path.with_name(path.stem + PROJECTOR_SUFFIX)
                st = path.stat()
                models[key] = Model(key, path, st.st_size, st.st_mtime,
                                    projector=proj if proj.is_file() else None)
        self._models = models
        return models

    def resolve(self, name: str) -> Model | None:
        """The model called ``name``; None if there is none. InvalidName for a bad name."""
        return self._models.get(normalize(name))

    def list(self) -> list[Model]:
        return list(self._models.values())

    def facts(self, model: Model) -> ModelFacts:
        """GGUF facts for ``model`` (header only, cached while the file is unchanged)."""
        st = model.path.stat()
        key = (model.path, st.st_size, st.st_mtime)
        facts = self._facts.get(key)
        if facts is None:
            proj = read_gguf(model.projector) if model.projector else None
            facts = facts_from_gguf(read_gguf(model.path), proj)
            self._facts[key] = facts
        return facts

    def digest(self, model: Model) -> str:
        """sha256 of the file (blocking; call from a worker thread), cached by size and mtime."""
        if model.digest:
            return model.digest
        st = model.path.stat()
        key = (model.path, st.st_size, st.st_mtime)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        h = hashlib.sha256()
        with open(model.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._digests[key] = digest
        return digest
