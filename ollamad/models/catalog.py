"""Which models exist: a folder of *.gguf files and Ollama's store (manifests/ + blobs/).

``tiny.gguf`` is the model ``tiny`` (also ``tiny:latest``); ``tiny.mmproj.gguf`` beside it
is its vision projector. A manifest ``manifests/registry.ollama.ai/library/gemma3/4b`` is
the model ``gemma3:4b`` with its params, template, system and projector layers. The
per-model settings file adds defaults and aliases. Names are looked up in a table, never
turned into paths, so a request cannot name a file outside the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from ollamad.models import store
from ollamad.models.config import ModelConfig, load_model_config
from ollamad.models.facts import ModelFacts, facts_from_gguf
from ollamad.models.ggufmeta import GGUFError, GGUFInfo, read_gguf
from ollamad.models.plan import ModelDefaults

log = structlog.get_logger("ollamad.catalog")
PROJECTOR_SUFFIX = ".mmproj.gguf"
_PART = r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,127}"
_NAME = re.compile(rf"^({_PART}(:[0-9]{{1,5}})?/)?({_PART}/)?{_PART}(:[a-zA-Z0-9_][a-zA-Z0-9_.\-]{{0,127}})?$")
DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")


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
    template: str | None = None  # store layers
    system: str | None = None
    license: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    store_name: store.Name | None = None  # set for models from Ollama's store


class Catalog:
    def __init__(self, folder: Path, config_path: Path | None = None, digest_cache: Path | None = None) -> None:
        self.folder = folder
        self.config_path = config_path
        self._models: dict[str, Model] = {}
        self._aliases: dict[str, str] = {}
        self._facts: dict[tuple[Path, int, float], ModelFacts] = {}
        self._facts_lock = threading.Lock()
        self._bad: dict[tuple[Path, int, float], GGUFError] = {}  # logged once, not read again
        self._digests = DigestCache(digest_cache)
        self._hashing = threading.Lock()  # one background hasher at a time

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
            for manifest in store.manifests(self.folder):
                model = self._from_manifest(manifest)
                if model is not None:
                    models[model.name] = model
        config = load_model_config(self.config_path)
        self._models, self._aliases = apply_config(models, config)
        threading.Thread(target=self.warm, name="ollamad-warm", daemon=True).start()
        return self._models

    def _from_manifest(self, m: store.Manifest) -> Model | None:
        layer = m.layer(store.MODEL)
        if layer is None:
            return None
        path = store.blob_path(self.folder, layer.digest)
        if not path.is_file():
            return None
        proj = m.layer(store.PROJECTOR)
        texts = {t: self._text(m, t) for t in (store.TEMPLATE, store.SYSTEM, store.LICENSE, store.PARAMS)}
        params: dict[str, Any] = {}
        if texts[store.PARAMS]:
            try:
                loaded = json.loads(texts[store.PARAMS] or "{}")
                params = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                params = {}
        num_ctx = params.get("num_ctx")
        defaults = ModelDefaults(num_ctx=num_ctx if isinstance(num_ctx, int) else None,
                                 options={k: v for k, v in params.items() if k != "num_ctx"})
        try:
            digest = m.digest
        except OSError:
            return None
        return Model(m.name.key, path, sum(x.size for x in m.layers), m.modified,
                     projector=store.blob_path(self.folder, proj.digest) if proj else None,
                     defaults=defaults, digest=digest, template=texts[store.TEMPLATE],
                     system=texts[store.SYSTEM], license=texts[store.LICENSE], params=params,
                     store_name=m.name)

    def _text(self, m: store.Manifest, media_type: str) -> str | None:
        layer = m.layer(media_type)
        if layer is None or layer.size > 1 << 20:
            return None
        try:
            return store.blob_path(self.folder, layer.digest).read_text(errors="replace")
        except OSError:
            return None

    def resolve(self, name: str) -> Model | None:
        """The model called ``name``; None if there is none. InvalidName for a bad name."""
        key = normalize(name)
        return self._models.get(self._aliases.get(key, key))

    def info(self, model: Model) -> GGUFInfo:
        """The model's whole GGUF header (for /api/show)."""
        return read_gguf(model.path)

    def list(self) -> list[Model]:
        return list(self._models.values())

    def facts(self, model: Model) -> ModelFacts:
        """GGUF facts for ``model`` (header only, cached while the file is unchanged)."""
        with self._facts_lock:  # the background warm-up and a request: one reads, one logs
            st = model.path.stat()
            key = (model.path, st.st_size, st.st_mtime)
            facts = self._facts.get(key)
            if facts is not None:
                return facts
            if key in self._bad:
                raise self._bad[key]
            try:
                proj = read_gguf(model.projector) if model.projector else None
                facts = facts_from_gguf(read_gguf(model.path), proj)
            except (GGUFError, ValueError, TypeError, ArithmeticError) as e:
                err = e if isinstance(e, GGUFError) else GGUFError(f"invalid model file {model.path.name}: {e}")
                self._bad[key] = err
                log.warning("skipping a model whose file cannot be read", model=model.name, error=str(err))
                raise err from None
            self._facts[key] = facts
            return facts

    def digest(self, model: Model) -> str:
        """The model's digest if known, else "" (never hashes: a request must not wait on that).

        Store models have theirs up front; a plain file's sha256 is computed by hash_missing in the
        background after a scan and kept, by path, size and mtime, across restarts.
        """
        return model.digest or self._digests.get(model.path)

    def warm(self) -> None:
        """Read every model's header and hash the files whose digest is unknown (a worker thread),
        so that no request pays for either: /api/tags answers from what is known."""
        for model in list(self._models.values()):
            with contextlib.suppress(GGUFError, OSError):
                self.facts(model)
        self.hash_missing()

    def hash_missing(self) -> None:
        """sha256 every plain model file whose digest is not known yet (blocking: a worker thread)."""
        if not self._hashing.acquire(blocking=False):
            return  # another thread is at it; it picks up what this scan added
        tried: set[Path] = set()
        try:
            while todo := [m for m in self._models.values() if not self.digest(m) and m.path not in tried]:
                for model in sorted(todo, key=lambda m: m.size):  # small ones are listed whole soonest
                    tried.add(model.path)
                    with contextlib.suppress(OSError):  # unreadable now: listed without a digest
                        self._digests.put(model.path, hash_file(model.path))
                self._digests.save()
        finally:
            self._hashing.release()


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """sha256 of model files keyed by path, size and mtime; saved as JSON (``path`` None: in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, int, str]] = {}
        if path is not None:
            try:
                raw = json.loads(path.read_text())
                self._known = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
                self._known = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> str:
        stamp = self._stamp(path)
        with self._lock:
            entry = self._known.get(str(path))
        return entry[2] if entry is not None and entry[:2] == stamp else ""

    def put(self, path: Path, digest: str) -> None:
        stamp = self._stamp(path)
        if stamp is not None:
            with self._lock:
                self._known[str(path)] = (*stamp, digest)

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            data = json.dumps({k: list(v) for k, v in self._known.items()})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(data)
            tmp.replace(self.path)
        except OSError:
            pass


def apply_config(models: dict[str, Model], config: ModelConfig) -> tuple[dict[str, Model], dict[str, str]]:
    """Per-model settings over store/file defaults; returns (models, alias -> model key)."""
    out = dict(models)
    aliases: dict[str, str] = {}
    for name, entry in config.entries.items():
        try:
            key = normalize(name)
        except InvalidName:
            continue
        model = out.get(key)
        if model is None:
            continue
        d = model.defaults
        out[key] = replace(model, defaults=ModelDefaults(
            num_ctx=entry.num_ctx or d.num_ctx, num_parallel=entry.num_parallel or d.num_parallel,
            keep_alive=entry.keep_alive if entry.keep_alive is not None else d.keep_alive,
            options={**d.options, **entry.options}, rpc=entry.rpc or d.rpc))
        for alias in entry.aliases:
            try:
                aliases[normalize(alias)] = key
            except InvalidName:
                continue
    return out, aliases
