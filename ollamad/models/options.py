"""Ollama's request ``options`` (the Modelfile's PARAMETERs too): load-time and sampling."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ollamad.models.plan import MIN_BATCH, LoadOptions

# Ollama's api.DefaultOptions() for the per-request options: what a model answers with when neither
# the request, the per-model settings nor the model's params layer says otherwise. llama-server's own
# defaults differ (top_p 0.95, min_p 0.05, repeat_penalty 1.0), so ollamad always sends these.
OLLAMA_DEFAULTS: dict[str, object] = {
    "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
    "repeat_last_n": 64, "repeat_penalty": 1.1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "seed": -1, "num_predict": -1,
}  # fmt: skip
PREDICT_PER_CTX = 10  # as Ollama: num_predict -1 (or more) is capped at 10 x num_ctx (context shift)


def with_ollama_defaults(options: dict[str, object]) -> dict[str, object]:
    """``options`` (model params, per-model settings) over Ollama's defaults (pure)."""
    return {**OLLAMA_DEFAULTS, **options}


def deterministic(sampling: dict[str, Any]) -> bool:
    """A fixed seed or greedy sampling: the answer must not depend on llama-server's prompt cache."""
    seed, temp = sampling.get("seed"), sampling.get("temperature")
    return (isinstance(seed, int) and seed >= 0) or temp == 0


class Options(BaseModel):
    """Ollama's ``options``: typed so a wrong type is a 400 naming the field; unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    # load-time: a runner must be (re)started for these
    num_ctx: int | None = Field(None, ge=1, le=1 << 24)
    num_batch: int | None = Field(None, ge=1, le=1 << 20)
    num_gpu: int | None = Field(None, ge=-1, le=10_000)
    main_gpu: int | None = Field(None, ge=0, le=1024)
    use_mmap: StrictBool | None = None
    num_thread: int | None = Field(None, ge=0, le=4096)
    # sampling: per request
    num_predict: int | None = Field(None, ge=-2, le=1 << 24)
    num_keep: int | None = Field(None, ge=-1, le=1 << 24)
    temperature: float | None = Field(None, ge=0, le=1e6)
    top_k: int | None = Field(None, ge=0, le=1 << 24)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0, le=1e6)
    repeat_last_n: int | None = Field(None, ge=-1, le=1 << 24)
    presence_penalty: float | None = Field(None, ge=-1e6, le=1e6)
    frequency_penalty: float | None = Field(None, ge=-1e6, le=1e6)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: list[str] | None = None
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0, le=1e6)
    mirostat_eta: float | None = Field(None, ge=0, le=1e6)

    def load_options(self) -> LoadOptions:
        # a smaller num_batch would crash llama-server; clamped here, 1 and 2 are one plan (no reload)
        batch = max(self.num_batch, MIN_BATCH) if self.num_batch is not None else None
        return LoadOptions(num_batch=batch, num_gpu=self.num_gpu, main_gpu=self.main_gpu,
                           use_mmap=self.use_mmap, num_thread=self.num_thread)

    def sampling(self) -> dict[str, Any]:
        """llama-server parameters for the sampling options that were given."""
        out: dict[str, Any] = {}
        names = {"num_keep": "n_keep", "num_predict": "n_predict"}
        for key in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                    "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop",
                    "mirostat", "mirostat_tau", "mirostat_eta", "num_keep", "num_predict"):
            value = getattr(self, key)
            if value is not None:
                out[names.get(key, key)] = value
        if out.get("n_predict", 0) < -1:  # -2: fill the context
            out["n_predict"] = -1
        if out.get("seed", 0) < 0:
            out["seed"] = -1
        return out


def check_params(params: object) -> dict[str, Any]:
    """A model's stored parameters (create, pull): ValueError naming a wrong type or value."""
    if not isinstance(params, dict):
        raise ValueError("parameters must be a JSON object")
    try:
        Options.model_validate(params)
    except ValidationError as e:
        parts = [f"{'.'.join(str(x) for x in i['loc'])}: {i['msg']}" for i in e.errors()[:5]]
        raise ValueError("; ".join(parts)) from None
    return params
