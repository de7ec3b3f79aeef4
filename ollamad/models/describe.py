"""Ollama's model details: family, parameter size, quantization level (pure)."""

from __future__ import annotations

from typing import Any

from ollamad.models.facts import ModelFacts

_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 8.0B, 137M, 361.9K."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{suffix}" if v >= 100 else f"{v:.1f}{suffix}"
    return str(n)


def quantization(facts: ModelFacts) -> str:
    if facts.file_type is None:
        return "unknown"
    return _FILE_TYPES.get(facts.file_type, f"type {facts.file_type}")


def details(facts: ModelFacts) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": facts.architecture,
        "families": [facts.architecture],
        "parameter_size": human_number(facts.parameter_count),
        "quantization_level": quantization(facts),
    }


def capabilities(facts: ModelFacts) -> list[str]:
    caps = ["embedding"] if facts.embedding else ["completion"]
    if facts.fim and not facts.embedding:
        caps.append("insert")
    if facts.vision:
        caps.append("vision")
    template = facts.chat_template or ""
    if "tools" in template or "tool_call" in template:
        caps.append("tools")
    return caps
