"""What the planner needs to know about a model, derived from its GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ollamad.models.ggufmeta import GGUFInfo, SkippedArray

MAX_TRAIN_CTX = 1 << 24  # a larger context_length (2^32-1 in a hostile file) is taken as this


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    train_ctx: int | None
    layers: int
    embd: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    weight_bytes: int
    parameter_count: int
    embedding: bool = False  # has <arch>.pooling_type: embedding-only, no completion
    vision: bool = False  # a projector is configured (or the model has a vision tower)
    projector_bytes: int = 0
    chat_template: str | None = None
    file_type: int | None = None
    recurrent_bytes_per_seq: int = 0  # SSM / conv state per sequence (hybrid models)
    swa_layers: int = 0
    vocab: int = 0
    layer_weight_bytes: int = 0  # tensors of the repeating blocks (blk.N.*): what -ngl moves
    fim: bool = False  # fill-in-the-middle tokens: generate with a suffix (llama-server /infill)
    context_clamped: bool = False  # the file's context_length was absurd: llama-server must be told train_ctx
    bos_token: int | None = None  # the token llama.cpp puts before a prompt, if it adds one

    @property
    def kv_width(self) -> int:
        """K plus V elements per token per layer."""
        return self.kv_heads * (self.key_length + self.value_length)


def _int(v: Any, default: int = 0) -> int:
    if isinstance(v, list):
        nums = [int(x) for x in v if isinstance(x, int | float)]
        return max(nums) if nums else default
    if isinstance(v, int | float) and not isinstance(v, bool):
        return int(v)
    return default


def facts_from_gguf(info: GGUFInfo, projector: GGUFInfo | None = None) -> ModelFacts:
    """Derive ModelFacts from a model's (and optional projector's) metadata."""
    layers = _int(info.arch("block_count"))
    embd = _int(info.arch("embedding_length"))
    heads = _int(info.arch("attention.head_count"), 1) or 1
    kv_heads = _int(info.arch("attention.head_count_kv"), heads) or heads
    head_dim = embd // heads if heads else 0
    key_length = _int(info.arch("attention.key_length"), head_dim) or head_dim
    value_length = _int(info.arch("attention.value_length"), head_dim) or head_dim
    file_ctx = _int(info.arch("context_length"))
    train_ctx = min(file_ctx, MAX_TRAIN_CTX) or None
    template = info.metadata.get("tokenizer.chat_template")
    recurrent = 0
    ssm_state = _int(info.arch("ssm.state_size"))
    ssm_inner = _int(info.arch("ssm.inner_size"))
    ssm_conv = _int(info.arch("ssm.conv_kernel"))
    if ssm_state or ssm_conv:
        # f32 recurrent state: conv (kernel-1) x inner + ssm state x inner, per layer
        recurrent = 4 * layers * ssm_inner * (max(ssm_conv - 1, 0) + ssm_state)
    shortconv = _int(info.arch("shortconv.l_cache"))
    if shortconv:
        recurrent += 4 * layers * embd * max(shortconv - 1, 0)
    return ModelFacts(
        architecture=info.architecture,
        train_ctx=train_ctx,
        layers=layers,
        embd=embd,
        heads=heads,
        kv_heads=kv_heads,
        key_length=key_length,
        value_length=value_length,
        weight_bytes=info.tensor_bytes,
        parameter_count=info.parameter_count,
        embedding=info.arch("pooling_type") is not None,
        vision=projector is not None or info.arch("vision.block_count") is not None,
        projector_bytes=projector.tensor_bytes if projector else 0,
        chat_template=template if isinstance(template, str) else None,
        file_type=_int(info.metadata.get("general.file_type"), -1)
        if "general.file_type" in info.metadata else None,
        recurrent_bytes_per_seq=recurrent,
        vocab=vocab_size(info),
        layer_weight_bytes=sum(t.n_bytes for t in info.tensors if t.name.startswith("blk.")),
        bos_token=_bos(info),
        fim=all(f"tokenizer.ggml.fim_{k}_token_id" in info.metadata for k in ("pre", "suf", "mid")),
        context_clamped=file_ctx > MAX_TRAIN_CTX,
    )


def vocab_size(info: GGUFInfo) -> int:
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, SkippedArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    return _int(info.arch("vocab_size"))


def _bos(info: GGUFInfo) -> int | None:
    bos = info.metadata.get("tokenizer.ggml.bos_token_id")
    if info.metadata.get("tokenizer.ggml.add_bos_token") is True and isinstance(bos, int):
        return bos
    return None
