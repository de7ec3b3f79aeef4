"""Memory a runner will need, from model facts and its plan (pure arithmetic).

The buffer formulas follow what llama-server allocates and logs (``... buffer size = X MiB``);
they were fitted against the generated test models and are table-tested against those logs
(tests/test_estimate.py). Process overhead (the binary, its libraries, heap) is not in
llama-server's log and is added separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollamad.models.facts import ModelFacts

# bytes per KV element by cache type (q8_0: 34 bytes per 32; q4_0: 18 per 32)
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MiB = 1024 * 1024
# RSS of an idle llama-server (CPU build) beyond its buffers, measured on the test models
PROCESS_OVERHEAD = 16 * MiB
# A CUDA runner's cost beyond its buffers, measured on an H100 (driver 580, CUDA 13): the context
# on each GPU it uses (GPU memory: 586 MiB for a runner with 84 MiB of GPU buffers, 693 MiB for
# SmolLM2's 537) and the CUDA runtime in its host memory (RSS 350 MiB where its host buffers
# were 14 MiB). Ollama reserves 457 MiB per CUDA GPU for the same reason (cudaMinimumMemory).
GPU_CONTEXT = 600 * MiB
GPU_RUNTIME_HOST = 350 * MiB


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv: int
    recurrent: int
    compute: int
    output: int
    overhead: int
    layers: int = 0
    layer_weights: int = 0  # weights of the repeating layers (what --n-gpu-layers moves)

    @property
    def buffers(self) -> int:
        """What llama-server itself reports in its log (model + KV + RS + compute + output)."""
        return self.weights + self.kv + self.recurrent + self.compute + self.output

    @property
    def total(self) -> int:
        return self.buffers + self.overhead

    @property
    def per_layer(self) -> int:
        """Bytes one repeating layer adds when offloaded to a GPU (weights and its KV)."""
        return 0 if not self.layers else (self.layer_weights + self.kv + self.recurrent) // self.layers


CTX_PAD = 256  # llama.cpp pads each sequence's context to a multiple of this


def slot_context(ctx: int) -> int:
    """The context llama.cpp really gives each slot: ``ctx`` padded up to a multiple of 256."""
    return max(-(-ctx // CTX_PAD) * CTX_PAD, CTX_PAD)


def compute_bytes(facts: ModelFacts, ctx_per_slot: int, n_ubatch: int = 512,
                  flash_attention: bool = False) -> int:
    """llama.cpp's compute buffer for one ubatch (graph peak, f32 activations).

    Without flash attention the peak is in attention: scores (heads x ctx) and the mask
    (ctx) per token, on top of the layer's live activations (5 x embd + 2 x kv dim).
    ``n_ubatch`` is already capped by the context asked for.
    """
    ub = max(n_ubatch, 1)
    head_dim = facts.embd // facts.heads if facts.heads else 0
    kv_dim = facts.kv_heads * head_dim
    live = 5 * facts.embd + 2 * kv_dim
    if flash_attention:
        return 4 * ub * 13 * facts.embd  # fitted: FA streams the scores, no heads x ctx matrix
    return 4 * ub * (ctx_per_slot * (facts.heads + 1) + live)


def estimate_memory(facts: ModelFacts, num_parallel: int, ctx: int, kv_type: str = "f16",
                    n_batch: int = 2048, n_ubatch: int = 512, flash_attention: bool = False,
                    process_overhead: int = PROCESS_OVERHEAD) -> Estimate:
    """Estimate a llama-server's memory for ``num_parallel`` slots of ``ctx`` tokens each."""
    per_slot = slot_context(ctx)
    kv = int(facts.layers * num_parallel * per_slot * facts.kv_width * KV_BYTES.get(kv_type, 2.0))
    recurrent = facts.recurrent_bytes_per_seq * num_parallel
    # llama-server caps the batch by the --ctx-size it was given, before any padding
    compute = compute_bytes(facts, per_slot, min(n_ubatch, n_batch, num_parallel * ctx), flash_attention)
    output = 4 * facts.vocab * num_parallel  # logits for one output per sequence
    return Estimate(
        weights=facts.weight_bytes + facts.projector_bytes,
        kv=kv,
        recurrent=recurrent,
        compute=compute,
        output=output,
        overhead=process_overhead,
        layers=facts.layers,
        layer_weights=facts.layer_weight_bytes,
    )
