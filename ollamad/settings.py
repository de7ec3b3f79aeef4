"""The one settings object, read from the environment with Ollama's variable names.

Settings Ollama also has keep their ``OLLAMA_*`` names so existing systemd ``Environment=``
overrides keep working; ollamad's own additions are ``OLLAMAD_*``. Pure data and
validation: nothing here touches hardware or the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ollamad.durations import FOREVER, keep_alive_from_env, parse_go_duration

DEFAULT_PORT = 11434
LOAD_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")  # need a (re)load
SINGLE_SLOT_ARCHITECTURES = ("mllama", "qwen3vl", "qwen3vlmoe", "qwen3next", "lfm2", "lfm2moe")


def _clean(value: Any) -> Any:
    """Ollama trims spaces and quotes from every variable."""
    if isinstance(value, str):
        return value.strip().strip("\"'").strip()
    return value


def _duration(value: Any) -> Any:
    value = _clean(value)
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError:
            try:
                return float(int(value))
            except ValueError:
                raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h)") from None
    return value


def _keep_alive(value: Any) -> Any:
    value = _clean(value)
    if isinstance(value, str):
        return keep_alive_from_env(value)
    if isinstance(value, int | float) and value < 0:
        return FOREVER
    return value


def _bool(value: Any) -> Any:
    value = _clean(value)
    if isinstance(value, str) and value == "":
        return False
    return value


def _bytes(value: Any) -> Any:
    """Byte counts: plain integers, or with a unit (512MiB, 2GB, 1.5G)."""
    value = _clean(value)
    if isinstance(value, str):
        return parse_bytes(value)
    return value


def _csv(value: Any) -> Any:
    value = _clean(value)
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def parse_bytes(text: str) -> int:
    """Parse "1073741824", "512MiB", "2GB", "1.5g" into bytes."""
    s = text.strip().lower().replace(" ", "")
    units = {
        "": 1, "b": 1,
        "k": 1024, "kb": 1000, "kib": 1024,
        "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
        "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
        "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    }  # fmt: skip
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"invalid size {text!r} (use e.g. 1073741824, 512MiB or 2GB)")
    return int(float(num) * units[unit])


Seconds = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
KeepAliveSeconds = Annotated[float, BeforeValidator(_keep_alive)]
Flag = Annotated[bool, BeforeValidator(_bool)]
ByteCount = Annotated[int, BeforeValidator(_bytes), Field(ge=0)]
CsvList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_csv)]  # comma-separated, not JSON


def _default_models_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "ollamad" / "models"


def _default_runners_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ollamad" / "runners"


def _default_state_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ollamad"


def _env(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name))


class Settings(BaseSettings):
    """Every setting ollamad reads; the env-var name is each field's alias."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    # --- shared with Ollama -----------------------------------------------------------
    host: str = Field("127.0.0.1:11434", validation_alias="OLLAMA_HOST",
                      description="Address the API listens on (host:port, :port, or a URL)")
    models: Path = Field(default_factory=_default_models_dir, validation_alias="OLLAMA_MODELS",
                         description="Folder of *.gguf models (or Ollama's manifests/ + blobs/ store)")
    num_parallel: int = Field(0, ge=0, validation_alias="OLLAMA_NUM_PARALLEL",
                              description="Parallel requests per model; 0 = auto (4 if it fits, else 1)")
    context_length: int = Field(4096, ge=1, validation_alias="OLLAMA_CONTEXT_LENGTH",
                                description="Default context per request when num_ctx is not given")
    keep_alive: KeepAliveSeconds = Field(300.0, validation_alias="OLLAMA_KEEP_ALIVE",
                                         description="How long an idle model stays loaded (5m; negative = forever)")
    max_loaded_models: int = Field(0, ge=0, validation_alias="OLLAMA_MAX_LOADED_MODELS",
                                   description="Most models loaded at once; 0 = auto (3 x GPUs, 3 without GPU)")
    max_queue: int = Field(512, ge=0, validation_alias="OLLAMA_MAX_QUEUE",
                           description="Most requests waiting in the queue before 503")
    load_timeout: Seconds = Field(300.0, validation_alias="OLLAMA_LOAD_TIMEOUT",
                                  description="Stall timeout while a model loads; restarts on each line of output")
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", validation_alias="OLLAMA_KV_CACHE_TYPE", description="KV cache element type")
    flash_attention: Flag = Field(False, validation_alias="OLLAMA_FLASH_ATTENTION",
                                  description="Enable flash attention in llama-server")
    gpu_overhead: ByteCount = Field(0, validation_alias="OLLAMA_GPU_OVERHEAD",
                                    description="Bytes of GPU memory to leave unused per GPU")
    sched_spread: Flag = Field(False, validation_alias="OLLAMA_SCHED_SPREAD",
                               description="Spread every model over all GPUs")
    origins: CsvList = Field(
        (), validation_alias="OLLAMA_ORIGINS", description="Extra allowed CORS origins, comma-separated")
    debug: Flag = Field(False, validation_alias="OLLAMA_DEBUG", description="Debug logging")

    # --- ollamad's own ----------------------------------------------------------------
    llama_server: Path | None = Field(None, validation_alias="OLLAMAD_LLAMA_SERVER",
                                      description="Path of the llama-server binary to run")
    runners_dir: Path = Field(default_factory=_default_runners_dir, validation_alias="OLLAMAD_RUNNERS_DIR",
                              description="Where runners/build.sh caches built llama-server binaries")
    single_slot_architectures: CsvList = Field(
        SINGLE_SLOT_ARCHITECTURES, validation_alias="OLLAMAD_SINGLE_SLOT_ARCHITECTURES",
        description="Architectures forced to one parallel request, comma-separated")
    sched_policy: Literal["affinity", "fifo"] = Field(
        "affinity", validation_alias="OLLAMAD_SCHED_POLICY",
        description="affinity: serve queued requests of loaded models first (bounded); fifo: loads in arrival order")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", validation_alias="OLLAMAD_EVENT_LOOP",
        description="The daemon's event loop: uvloop (libuv; less CPU per relayed token) or Python's asyncio")
    max_passover: Seconds = Field(10.0, validation_alias="OLLAMAD_MAX_PASSOVER",
                                  description="Longest a request needing a load may be passed over (affinity policy)")
    send_ahead: int = Field(
        1, ge=0, le=8, validation_alias="OLLAMAD_SEND_AHEAD",
        description="Queued requests sent to a busy runner ahead of a free slot, per slot: llama-server queues "
                    "them and starts the next the moment a slot frees; 0 = only as many as it has slots")
    memory_budget: ByteCount = Field(0, validation_alias="OLLAMAD_MEMORY_BUDGET",
                                     description="Most memory all runners may use together; 0 = what is free")
    memory_poll: Seconds = Field(1.0, validation_alias="OLLAMAD_MEMORY_POLL",
                                 description="How often GPU memory (NVML) and host memory (RSS, free) are measured")
    memory_reserve: ByteCount = Field(256 * 1024**2, validation_alias="OLLAMAD_MEMORY_RESERVE",
                                      description="Free memory never given to a new runner (per GPU, and of host RAM)")
    memory_low_water: ByteCount = Field(128 * 1024**2, validation_alias="OLLAMAD_MEMORY_LOW_WATER",
                                        description="Below this much free memory, idle models are unloaded (LRU first)")
    stop_grace: Seconds = Field(10.0, validation_alias="OLLAMAD_STOP_GRACE",
                                description="How long a runner gets after SIGTERM before SIGKILL")
    drain_timeout: Seconds = Field(30.0, validation_alias="OLLAMAD_DRAIN_TIMEOUT",
                                   description="On SIGTERM, how long in-flight and queued requests may finish")
    load_backoff: Seconds = Field(5.0, validation_alias="OLLAMAD_LOAD_BACKOFF",
                                  description="First wait before retrying a model that failed to load (doubles)")
    request_load_options: CsvList = Field(
        LOAD_OPTIONS, validation_alias="OLLAMAD_REQUEST_LOAD_OPTIONS",
        description="Load-time options a request may set, comma-separated (others are ignored); "
                    "on a shared machine e.g. num_ctx alone")
    accept_timeout: Seconds = Field(
        60.0, validation_alias="OLLAMAD_ACCEPT_TIMEOUT",
        description="Longest a runner may take to accept a streamed request (it compiles a format's grammar "
                    "first); past it the request fails and the runner is replaced, unless every slot is busy "
                    "(it waits in the runner's queue: another while)")
    reload_interval: Seconds = Field(
        10.0, validation_alias="OLLAMAD_RELOAD_INTERVAL",
        description="Least time between two loads of one model that request options force (num_ctx, num_batch, ...); "
                    "such a request waits")
    runner_env_pass: CsvList = Field(
        ("GGML_*", "LLAMA_*"), validation_alias="OLLAMAD_RUNNER_ENV_PASS",
        description="Environment variables passed on to llama-server, comma-separated (NAME or PREFIX*)")
    threads: int = Field(0, ge=0, validation_alias="OLLAMAD_THREADS",
                         description="Threads per llama-server; 0 = llama-server's default")
    model_settings: Path | None = Field(None, validation_alias="OLLAMAD_MODEL_SETTINGS",
                                        description="Per-model settings file (TOML, see config/models.toml)")
    create_dirs: Annotated[tuple[Path, ...], NoDecode, BeforeValidator(_csv)] = Field(
        (), validation_alias="OLLAMAD_CREATE_DIRS",
        description="Folders /api/create may read GGUF files from, comma-separated (the models folder always)")
    health_interval: Seconds = Field(5.0, validation_alias="OLLAMAD_HEALTH_INTERVAL",
                                     description="How often a loaded runner's /health is checked")
    health_timeout: Seconds = Field(20.0, validation_alias="OLLAMAD_HEALTH_TIMEOUT",
                                    description="A runner silent on /health this long is hung: killed and replaced. "
                                                "A hang is found within interval + timeout (25 s by default)")
    state_dir: Path = Field(default_factory=_default_state_dir, validation_alias="OLLAMAD_STATE_DIR",
                            description="Where the pids of started runners are recorded (cleanup after a crash)")
    api_key: str = Field("", validation_alias="OLLAMAD_API_KEY",
                         description="If set, API requests need 'Authorization: Bearer <key>' (/, /api/version open)")
    max_body: ByteCount = Field(64 * 1024**2, validation_alias="OLLAMAD_MAX_BODY",
                                description="Largest request body accepted (e.g. 64MiB); larger gets 413")
    embed_max_inputs: int = Field(2048, ge=1, validation_alias="OLLAMAD_EMBED_MAX_INPUTS",
                                  description="Most inputs one embedding request may carry (more: 400)")
    embed_max_tokens: int = Field(300_000, ge=1, validation_alias="OLLAMAD_EMBED_MAX_TOKENS",
                                  description="Most tokens one embedding request may embed in all (more: 400)")
    format_max_properties: int = Field(
        256, ge=1, validation_alias="OLLAMAD_FORMAT_MAX_PROPERTIES",
        description="Most properties in a request's JSON schemas (format, response_format, tools); more: 400")
    format_max_bytes: ByteCount = Field(64 * 1024, validation_alias="OLLAMAD_FORMAT_MAX_BYTES",
                                        description="Largest JSON schema (or grammar) a request may send; more: 400")
    max_prompt: int = Field(16 * 1024**2, ge=1, validation_alias="OLLAMAD_MAX_PROMPT",
                            description="Most characters of text (prompt, system, messages) in one request; more: 400")
    pull_allow: CsvList = Field(
        (), validation_alias="OLLAMAD_PULL_ALLOW",
        description="Private, loopback or link-local hosts /api/pull may reach (names, IPs, CIDRs; * = any)")
    pull_timeout: Seconds = Field(30.0, validation_alias="OLLAMAD_PULL_TIMEOUT",
                                  description="/api/pull: longest wait to connect to a registry, and between reads")
    log_requests: Flag = Field(False, validation_alias="OLLAMAD_LOG_REQUESTS",
                               description="Log request bodies (prompts) and replies; off by default")
    allowed_hosts: CsvList = Field(
        (), validation_alias="OLLAMAD_ALLOWED_HOSTS",
        description="Extra Host names accepted on loopback connections, comma-separated (*.example.com, * = all)")
    header_timeout: Seconds = Field(30.0, gt=0, validation_alias="OLLAMAD_HEADER_TIMEOUT",
                                    description="A connection must send a request's headers within this long "
                                                "(of opening, or of its last answer); idle ones close then too")
    body_timeout: Seconds = Field(60.0, validation_alias="OLLAMAD_BODY_TIMEOUT",
                                  description="A JSON request body must arrive within this long (408 after); "
                                              "an upload may pause this long; 0 = no limit")
    write_timeout: Seconds = Field(60.0, validation_alias="OLLAMAD_WRITE_TIMEOUT",
                                   description="A client that reads none of its answer this long is cut off "
                                               "(its request cancelled, its slot freed); 0 = no limit")
    max_connections: int = Field(0, ge=0, validation_alias="OLLAMAD_MAX_CONNECTIONS",
                                 description="Most open client connections; more get 503; 0 = auto "
                                             "(3/4 of the open-file limit)")
    rpc_workers: CsvList = Field(
        (), validation_alias="OLLAMAD_RPC_WORKERS",
        description="llama.cpp RPC workers (ollamad worker) a model too big for this machine may spread over: "
                    "host:port,... (no authentication: private network only)")
    rpc_check_interval: Seconds = Field(2.0, validation_alias="OLLAMAD_RPC_CHECK_INTERVAL",
                                        description="How often each RPC worker is checked (up, free memory)")
    # --- ollamad worker (the RPC worker side) ----------------------------------------
    rpc_server: Path | None = Field(None, validation_alias="OLLAMAD_RPC_SERVER",
                                    description="ollamad worker: path of the RPC worker binary (ggml-rpc-server)")
    worker_host: str = Field("127.0.0.1", validation_alias="OLLAMAD_WORKER_HOST",
                             description="ollamad worker: address to listen on (a private one; never 0.0.0.0)")
    worker_port: int = Field(50052, ge=1, le=65535, validation_alias="OLLAMAD_WORKER_PORT",
                             description="ollamad worker: port to listen on")
    worker_cache: Path | None = Field(None, validation_alias="OLLAMAD_WORKER_CACHE",
                                      description="ollamad worker: folder for the tensor cache (empty = no cache)")
    worker_threads: int = Field(0, ge=0, validation_alias="OLLAMAD_WORKER_THREADS",
                                description="ollamad worker: CPU threads; 0 = one per core")
    worker_bind_any: Flag = Field(False, validation_alias="OLLAMAD_WORKER_BIND_ANY",
                                  description="ollamad worker: allow 0.0.0.0 / :: (every network can use it)")

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, v: Any) -> Any:
        v = _clean(v)
        if isinstance(v, str):
            parse_host(v)
        return v

    @field_validator("rpc_workers")
    @classmethod
    def _workers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            parse_endpoint(item)
        return v

    @field_validator("models", "llama_server", "runners_dir", "model_settings", "state_dir", "rpc_server",
                     "worker_cache", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        v = _clean(v)
        if isinstance(v, str):
            return Path(v).expanduser() if v else None
        return v

    @field_validator("num_parallel", "context_length", "max_loaded_models", "max_queue", "threads", "api_key",
                     "max_connections", "embed_max_inputs", "embed_max_tokens", "format_max_properties", "max_prompt",
                     "worker_host", "worker_port", "worker_threads", mode="before")
    @classmethod
    def _int(cls, v: Any) -> Any:
        return _clean(v)

    @field_validator("request_load_options")
    @classmethod
    def _load_options(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [x for x in v if x not in LOAD_OPTIONS]
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}; choose from {', '.join(LOAD_OPTIONS)}")
        return v

    @property
    def bind(self) -> tuple[str, int]:
        return parse_host(self.host)


def parse_host(value: str) -> tuple[str, int]:
    """OLLAMA_HOST as Ollama reads it: "host", "host:port", ":port", "http://host:port"."""
    s = value.strip()
    for scheme in ("http://", "https://"):
        if s.startswith(scheme):
            s = s[len(scheme) :]
    s = s.rstrip("/")
    host, port = s, DEFAULT_PORT
    if s.startswith("["):  # [::1]:11434
        end = s.find("]")
        if end < 0:
            raise ValueError(f"invalid host {value!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:], value)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, value)
    return host or "127.0.0.1", port


def parse_endpoint(value: str) -> tuple[str, int]:
    """An RPC worker address: "host:port" or "[v6]:port"; the port is required."""
    s = value.strip()
    if (s.count(":") != 1 and not s.startswith("[")) or (s.startswith("[") and "]:" not in s):
        raise ValueError(f"invalid RPC worker {value!r} (use host:port)")
    host, port = s.rsplit(":", 1)
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"invalid RPC worker {value!r} (use host:port)")
    return host, _port(port, value)


def _port(text: str, value: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port in {value!r}")
    return int(text)


class SettingsError(Exception):
    """Start-up settings are invalid; the message names each variable."""


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment (or ``env``), raising SettingsError on bad values."""
    try:
        if env is None:
            return Settings(**overrides)
        data: dict[str, Any] = {k: v for k, v in env.items() if k.startswith("OLLAMA")}
        data.update(overrides)
        return Settings.model_validate(data)
    except ValidationError as e:
        raise SettingsError(describe_errors(e)) from None


def describe_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        field = Settings.model_fields.get(name)
        if field is not None and isinstance(field.validation_alias, str):
            name = field.validation_alias
        got = item.get("input")
        msg = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"invalid {name}={got!r}: {msg}")
    return "; ".join(lines)


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias)
