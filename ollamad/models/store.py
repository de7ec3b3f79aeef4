"""Ollama's model store: ``manifests/HOST/NAMESPACE/MODEL/TAG`` JSON files + ``blobs/sha256-*``.

Names are parsed and checked before they touch the file system; blob paths come only from
validated digests, so no request can reach a file outside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL, PROJECTOR, PARAMS, TEMPLATE, SYSTEM, LICENSE = (
    MEDIA_PREFIX + k for k in ("model", "projector", "params", "template", "system", "license"))

_PART = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,79}$")
_HOST = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,252}(:[0-9]{1,5})?$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.\-]{0,127}$")
_DIGEST = re.compile(r"^sha256[:\-]([0-9a-f]{64})$")


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """The catalog key: ``gemma3:4b``, ``ns/model:tag`` or ``host/ns/model:tag``."""
        if self.host == DEFAULT_HOST:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def manifest_path(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


def parse_name(text: str) -> Name:
    """``[host/][namespace/]model[:tag]`` -> Name, lower-cased; StoreError if malformed."""
    s = text.strip().lower()
    tag = DEFAULT_TAG
    last = s.rsplit("/", 1)[-1]
    if ":" in last:
        s, tag = s.rsplit(":", 1)
    parts = s.split("/")
    if len(parts) == 1:
        host, ns, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (ns, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, ns, model = parts
    else:
        raise StoreError(f"invalid model name {text!r}")
    if not (_HOST.match(host) and _PART.match(ns) and _PART.match(model) and _TAG.match(tag)) or ".." in s:
        raise StoreError(f"invalid model name {text!r}")
    return Name(host, ns, model, tag)


def check_digest(digest: str) -> str:
    """``sha256:<hex>`` (or ``sha256-<hex>``) -> ``sha256:<hex>``; StoreError otherwise."""
    m = _DIGEST.match(digest.strip())
    if not m:
        raise StoreError(f"invalid digest {digest!r}: want sha256:<64 hex digits>")
    return f"sha256:{m.group(1)}"


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / check_digest(digest).replace(":", "-")


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: Name
    path: Path
    layers: tuple[Layer, ...]
    config: Layer | None
    modified: float
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def layer(self, media_type: str) -> Layer | None:
        return next((x for x in self.layers if x.media_type == media_type), None)

    @property
    def digest(self) -> str:
        """Ollama lists a model's digest as the sha256 of its manifest file."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def parse_manifest(name: Name, path: Path, data: bytes) -> Manifest:
    try:
        body = json.loads(data)
        layers = tuple(_layer(x) for x in body.get("layers") or [])
        config = _layer(body["config"]) if body.get("config") else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"bad manifest {path}: {e}") from None
    return Manifest(name, path, layers, config, path.stat().st_mtime if path.exists() else 0.0, body)


MAX_LAYERS = 64
MAX_LAYER_SIZE = 1 << 40  # bytes: 1 TiB


def check_manifest(name: Name, path: Path, data: bytes) -> Manifest:
    """A manifest from a registry, checked before it is stored: StoreError naming what is wrong."""
    try:
        body = json.loads(data)
    except ValueError:
        raise StoreError("the registry's manifest is not JSON") from None
    if not isinstance(body, dict) or body.get("schemaVersion") != 2:
        raise StoreError("not an image manifest (schemaVersion 2)")
    layers, config = body.get("layers"), body.get("config")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise StoreError(f"a manifest needs 1 to {MAX_LAYERS} layers")
    for x in [*layers, *([config] if config is not None else [])]:
        if not (isinstance(x, dict) and isinstance(x.get("mediaType"), str) and isinstance(x.get("digest"), str)
                and type(x.get("size")) is int and 0 <= x["size"] <= MAX_LAYER_SIZE):
            raise StoreError("a manifest layer needs a mediaType, a digest and a size")
        check_digest(x["digest"])
    if sum(1 for x in layers if x["mediaType"] == MODEL) != 1:
        raise StoreError("a manifest needs exactly one model layer")
    return parse_manifest(name, path, data)


def _layer(x: dict[str, Any]) -> Layer:
    return Layer(str(x["mediaType"]), check_digest(str(x["digest"])), int(x.get("size", 0)))


def manifests(root: Path) -> Iterator[Manifest]:
    """Every readable manifest under ``root/manifests`` (bad ones are skipped)."""
    base = root / "manifests"
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/*/*/*")):
        if not path.is_file():
            continue
        host, ns, model, tag = path.relative_to(base).parts
        try:
            name = parse_name(f"{host}/{ns}/{model}:{tag}")
            yield parse_manifest(name, path, path.read_bytes())
        except (StoreError, OSError):
            continue


def manifest_body(layers: list[Layer], config: Layer | None) -> dict[str, Any]:
    body: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE}
    if config is not None:
        body["config"] = {"mediaType": config.media_type, "digest": config.digest, "size": config.size}
    body["layers"] = [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in layers]
    return body


def temp_beside(path: Path, what: str = "tmp") -> Path:
    """A unique hidden file name next to ``path`` (concurrent writers never share one)."""
    return path.with_name(f".{path.name}.{what}-{secrets.token_hex(6)}")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:  # a full disk must not leave a partial file behind
        tmp.unlink(missing_ok=True)


def write_blob(root: Path, data: bytes) -> Layer:
    """Store ``data`` as a blob; returns a layer with an empty media type."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(root, digest)
    if not path.exists():
        write_atomic(path, data)
    return Layer("", digest, len(data))


def link_blob(root: Path, source: Path, digest: str) -> Path:
    """Put ``source`` (whose sha256 is ``digest``) into the store, by hard link when possible."""
    path = blob_path(root, digest)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            import shutil

            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_manifest(root: Path, name: Name, layers: list[Layer], config: Layer | None = None) -> Path:
    if config is None:
        cfg = json.dumps({"model_format": "gguf", "model_family": "", "file_type": ""}).encode()
        c = write_blob(root, cfg)
        config = Layer(CONFIG_TYPE, c.digest, c.size)
    path = name.manifest_path(root)
    write_atomic(path, json.dumps(manifest_body(layers, config), indent=None).encode())
    return path


def _digests(m: Manifest) -> set[str]:
    return {x.digest for x in m.layers} | ({m.config.digest} if m.config else set())


def remove_manifest(root: Path, name: Name) -> bool:
    """Delete a model's manifest and those of its blobs no other manifest uses; False if none.

    Blobs of no manifest at all (an upload waiting for /api/create) are left alone.
    """
    path = name.manifest_path(root)
    if not path.is_file():
        return False
    try:
        mine = _digests(parse_manifest(name, path, path.read_bytes()))
    except StoreError:
        mine = set()
    path.unlink()
    for parent in list(path.parents)[:3]:  # tidy empty model/namespace/host folders
        try:
            parent.rmdir()
        except OSError:
            break
    used: set[str] = set()
    for m in manifests(root):
        used |= _digests(m)
    for digest in mine - used:
        blob_path(root, digest).unlink(missing_ok=True)
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
