"""The per-model settings file (TOML; see config/models.toml):

    [models."tiny"]
    num_ctx = 2048
    num_parallel = 2
    keep_alive = "10m"
    aliases = ["mini"]
    options = { temperature = 0.2, stop = ["</s>"] }
    rpc = "auto"        # or "always" / "never": spread over OLLAMAD_RPC_WORKERS
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ollamad.durations import keep_alive_from_request
from ollamad.models.options import Options
from ollamad.models.plan import RpcMode  # typed as in requests: a wrong type names the option


class ModelConfigError(ValueError):
    pass


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_ctx: int | None = Field(None, ge=1, le=1 << 24)
    num_parallel: int | None = Field(None, ge=1, le=256)
    keep_alive: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    rpc: RpcMode | None = None  # auto: RPC workers only when too big here; always; never

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        return None if v is None else keep_alive_from_request(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            Options.model_validate(v)
        except ValidationError as e:
            item = e.errors()[0]
            raise ValueError(f"{'.'.join(str(x) for x in item['loc'])}: {item['msg']}") from None
        return v


@dataclass(frozen=True)
class ModelConfig:
    entries: dict[str, ModelEntry]


def parse_model_config(text: str, where: str = "model settings") -> ModelConfig:
    """Parse the file's text; ModelConfigError names the model and field that is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelConfigError(f"{where}: {e}") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise ModelConfigError(f"{where}: unknown section(s) {sorted(unknown)}; use [models.\"NAME\"]")
    entries: dict[str, ModelEntry] = {}
    for name, body in (data.get("models") or {}).items():
        try:
            entries[name] = ModelEntry.model_validate(body)
        except ValidationError as e:
            item = e.errors()[0]
            loc = ".".join(str(x) for x in item["loc"])
            raise ModelConfigError(f"{where}: models.{name}.{loc}: {item['msg']}") from None
    return ModelConfig(entries)


def load_model_config(path: Path | None) -> ModelConfig:
    if path is None or not path.is_file():
        return ModelConfig({})
    return parse_model_config(path.read_text(), str(path))
