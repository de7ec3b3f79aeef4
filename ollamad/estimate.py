"""Memory a runner will need, from model facts and its plan (pure arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass

from ollamad.modelfacts import ModelFacts

# bytes per KV element by cache type (q8_0: 34 bytes per 32; q4_0: 18 per 32)
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MiB = 1024 * 1024


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv: int
    recurrent: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.recurrent + self.compute + self.overhead


def estimate_memory(facts: ModelFacts, num_parallel: int, ctx: int, kv_type: str = "f16",
                    n_batch: int = 2048, n_ubatch: int = 512,
                    process_overhead: int = 0) -> Estimate:
    """Estimate a llama-server's memory for ``num_parallel`` slots of ``ctx`` tokens each."""
    total_ctx = num_parallel * ctx
    kv = int(facts.layers * total_ctx * facts.kv_width * KV_BYTES.get(kv_type, 2.0))
    recurrent = facts.recurrent_bytes_per_seq * num_parallel
    ubatch = min(n_ubatch, n_batch, max(total_ctx, 1))
    # compute graph: activations for one ubatch (f32) plus attention scores over the context
    compute = 4 * ubatch * (4 * facts.embd + facts.heads * min(total_ctx, 4096) // 8)
    compute += 4 * ubatch * 2 * max(facts.embd, 1)
    return Estimate(
        weights=facts.weight_bytes + facts.projector_bytes,
        kv=kv,
        recurrent=recurrent,
        compute=compute,
        overhead=process_overhead,
    )
