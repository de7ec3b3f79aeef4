"""Generate small GGUF models with random weights (llama architecture, byte vocabulary).

Output is noise, but the compute, memory and timing in llama-server are real. Also writes
metadata-only files (no tensors) for planning tests of other architectures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Spec:
    """Shape of a generated llama model."""

    embd: int = 128
    heads: int = 2
    kv_heads: int = 1
    layers: int = 2
    ffn: int = 256
    ctx: int = 8192
    dtype: str = "f32"  # or "f16"
    chat_template: str | None = None


TINY = Spec()
SMALL = Spec(embd=256, heads=4, kv_heads=2, layers=4, ffn=512)
BIG = Spec(embd=1024, heads=16, kv_heads=4, layers=8, ffn=2816)
SPECS = {"tiny": TINY, "small": SMALL, "big": BIG}

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


CHAT = Spec(chat_template=CHATML + "{# tools #}")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    scores = [0.0] * len(tokens)
    # llama.cpp token types: 2 unknown, 3 control, 6 byte
    types = [2, 3, 3] + [6] * 256
    return tokens, scores, types


def write_llama(path: str | Path, spec: Spec = TINY, *, name: str | None = None, seed: int = 0,
                extra: dict[str, object] | None = None, endless: bool = False) -> Path:
    """Write a loadable llama-architecture model with random weights to ``path``.

    ``endless``: the end-of-sequence logit is 0 while the others spread wide, so generation
    practically never stops by itself (fault tests need streams that run until cut).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dt = np.float16 if spec.dtype == "f16" else np.float32
    tokens, scores, types = _vocab()
    vocab = len(tokens)
    head_dim = spec.embd // spec.heads
    kv_dim = head_dim * spec.kv_heads

    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name or path.stem)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.embd)
    w.add_block_count(spec.layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(1 if spec.dtype == "f16" else 0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)
    for key, value in (extra or {}).items():
        _add_any(w, key, value)

    def t(tname: str, *shape: int, scale: float = 0.02) -> None:
        w.add_tensor(tname, (rng.standard_normal(shape) * scale).astype(dt))

    def ones(tname: str, n: int) -> None:
        w.add_tensor(tname, np.ones(n, dtype=np.float32))

    t("token_embd.weight", vocab, spec.embd, scale=1.0)
    ones("output_norm.weight", spec.embd)
    if endless:
        out = rng.standard_normal((vocab, spec.embd)).astype(dt)
        out[2] = 0  # the eos token
        w.add_tensor("output.weight", out)
    else:
        t("output.weight", vocab, spec.embd)
    for i in range(spec.layers):
        ones(f"blk.{i}.attn_norm.weight", spec.embd)
        t(f"blk.{i}.attn_q.weight", spec.embd, spec.embd)
        t(f"blk.{i}.attn_k.weight", kv_dim, spec.embd)
        t(f"blk.{i}.attn_v.weight", kv_dim, spec.embd)
        t(f"blk.{i}.attn_output.weight", spec.embd, spec.embd)
        ones(f"blk.{i}.ffn_norm.weight", spec.embd)
        t(f"blk.{i}.ffn_gate.weight", spec.ffn, spec.embd)
        t(f"blk.{i}.ffn_up.weight", spec.ffn, spec.embd)
        t(f"blk.{i}.ffn_down.weight", spec.embd, spec.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def write_metadata_only(path: str | Path, arch: str, metadata: dict[str, object]) -> Path:
    """Write a GGUF with metadata and no tensors (for planning tests; it cannot be loaded)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    for key, value in metadata.items():
        _add_any(w, key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_any(w: object, key: str, value: object) -> None:
    import gguf

    writer: gguf.GGUFWriter = w  # type: ignore[assignment]
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"cannot write {key}={value!r}")


# Metadata-only models for planning tests: name -> (architecture, metadata)
METADATA_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    **{
        f"arch-{arch}": (arch, {f"{arch}.context_length": 32768, f"{arch}.block_count": 4,
                                f"{arch}.embedding_length": 256, f"{arch}.attention.head_count": 4,
                                f"{arch}.attention.head_count_kv": 2})
        for arch in ("mllama", "qwen3vl", "qwen3vlmoe", "qwen3next", "lfm2", "lfm2moe", "qwen3")
    },
    "embed-bert": ("bert", {"bert.context_length": 512, "bert.block_count": 2,
                            "bert.embedding_length": 128, "bert.attention.head_count": 2,
                            "bert.pooling_type": 1}),
    "short-ctx": ("llama", {"llama.context_length": 1024, "llama.block_count": 2,
                            "llama.embedding_length": 128, "llama.attention.head_count": 2,
                            "llama.attention.head_count_kv": 1}),
}


def write_all(folder: str | Path, which: tuple[str, ...] = ("tiny",)) -> list[Path]:
    """Write the named models into ``folder`` (tiny, small, big, meta, embed, chat, code)."""
    folder = Path(folder)
    out = []
    for name in which:
        if name == "meta":
            for mname, (arch, meta) in METADATA_MODELS.items():
                out.append(write_metadata_only(folder / f"{mname}.gguf", arch, meta))
        elif name == "embed":  # a loadable embedding model: llama with mean pooling
            out.append(write_llama(folder / "embed.gguf", TINY, name="embed", extra={"llama.pooling_type": 1}))
        elif name == "code":  # tiny with fill-in-the-middle tokens (generate with a suffix)
            fim: dict[str, object] = {
                f"tokenizer.ggml.fim_{k}_token_id": i for i, k in enumerate(("pre", "suf", "mid"), start=3)}
            out.append(write_llama(folder / "code.gguf", TINY, name="code", extra=fim))
        elif name == "chat":  # tiny with a ChatML template that mentions tools
            out.append(write_llama(folder / "chat.gguf", CHAT, name="chat"))
        else:
            out.append(write_llama(folder / f"{name}.gguf", SPECS[name], name=name))
    return out
