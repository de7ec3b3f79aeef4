"""From model facts, settings and request options to a RunnerPlan (pure).

Every rule about slots and context lives here: the forcing list, the embedding rule,
the vision floor (2048) and the floor of 4, clamping to the training context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ollamad.models.estimate import Estimate, estimate_memory
from ollamad.models.facts import ModelFacts

RpcMode = Literal["auto", "always", "never"]
MIN_CTX = 4
VISION_MIN_CTX = 2048
AUTO_PARALLEL = 4
MIN_BATCH = 32  # llama-server aborts with a batch below its slot count, and fails with a batch of 1
# Ollama renders a model without a chat template with ``{{ .Prompt }}``: each turn's user text, no
# role markers (consecutive user messages joined by a blank line). The same as a Jinja template for
# llama-server, whose own fallback would be chatml. System messages are left out by the routes
# (llama-server would fold them into the first user message).
PROMPT_ONLY_TEMPLATE = (
    '{%- set ns = namespace(prev="") -%}{%- for m in messages -%}{%- if m.role == "user" -%}'
    '{%- if ns.prev == "user" -%}{{ "\n\n" }}{%- endif -%}{{ m.content }}{%- endif -%}'
    "{%- set ns.prev = m.role -%}{%- endfor -%}"
)


@dataclass(frozen=True)
class LoadOptions:
    """Request options that can only take effect by (re)starting llama-server."""

    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int | None = None


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model defaults (from the model store or the per-model settings file)."""

    num_ctx: int | None = None
    num_parallel: int | None = None
    keep_alive: float | None = None
    options: dict[str, object] = field(default_factory=dict)
    rpc: RpcMode = "auto"  # spread over OLLAMAD_RPC_WORKERS: when too big locally, always, never


@dataclass(frozen=True)
class PlanSettings:
    """The part of Settings that planning reads."""

    num_parallel: int = 0
    context_length: int = 4096
    kv_cache_type: str = "f16"
    flash_attention: bool = False
    single_slot_architectures: tuple[str, ...] = ()
    threads: int = 0
    send_ahead: int = 1


# llama-server (cpp-httplib) serves each connection on a thread of a fixed pool for as long as the
# connection lives, kept-alive ones too; its default pool is max(--parallel + 2, cores - 1). The
# daemon may hold, per runner, a completion for each slot and each request sent ahead, a /tokenize
# beside each one (/api/generate), and its own probes: with fewer threads than that a request
# waits for a thread in llama-server's accept queue (measured: 8 clients on 4 slots of the big
# model ran at 65-71 tok/s in such rounds, 144-183 with enough threads).
HTTP_SPARE_THREADS = 8


def http_threads(num_parallel: int, send_ahead: int) -> int:
    """llama-server's --threads-http: every connection the daemon may hold to it at once."""
    return 2 * num_parallel * (1 + send_ahead) + HTTP_SPARE_THREADS


@dataclass(frozen=True)
class RunnerPlan:
    model: str
    path: Path
    num_parallel: int
    ctx: int  # per slot: what each request gets
    load: LoadOptions = LoadOptions()
    projector: Path | None = None
    embedding: bool = False
    kv_cache_type: str = "f16"
    flash_attention: bool = False
    threads: int = 0
    send_ahead: int = 1
    n_gpu_layers: int | None = None
    estimate: int = 0
    detail: Estimate | None = field(default=None, compare=False, repr=False)
    gpus: tuple[int, ...] = ()  # GPU indexes it is pinned to (CUDA_VISIBLE_DEVICES); () = all/none
    kv_overrides: tuple[str, ...] = ()  # --override-kv KEY=TYPE:VALUE (an absurd context_length clamped)
    notes: tuple[str, ...] = ()
    # split over RPC workers: their host:port, the bytes planned on each, and the share of
    # the offloaded layers each gets (--tensor-split); ``estimate`` is then the local part
    rpc: tuple[str, ...] = ()
    remote: tuple[int, ...] = ()
    tensor_split: tuple[float, ...] = ()
    prompt_only: bool = False  # no chat template: Ollama's ``{{ .Prompt }}``

    @property
    def total_ctx(self) -> int:
        return self.num_parallel * self.ctx

    def serves(self, model: str, ctx: int, load: LoadOptions) -> bool:
        """Can a runner with this plan take a request needing ``ctx`` with ``load``?"""
        return self.model == model and ctx <= self.ctx and load == self.load

    def argv(self, binary: str, port: int, api_key_file: str | None = None) -> list[str]:
        args = [
            binary, "--model", str(self.path), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(self.num_parallel), "--ctx-size", str(self.total_ctx),
            "--no-webui", "--slots", "--metrics", "--fit", "off",
            "--verbosity", "4",  # trace level: the "... buffer size = X MiB" lines memory reads
            "--threads-http", str(http_threads(self.num_parallel, self.send_ahead)),
        ]  # fmt: skip
        if api_key_file:  # a file, not the key: `ps` shows argv to every local user
            args += ["--api-key-file", api_key_file]
        if self.embedding:  # a whole input must fit in one physical batch
            args += ["--embeddings", "--ubatch-size", str(self.load.num_batch or self.ctx)]
            if self.load.num_batch is None:
                args += ["--batch-size", str(self.ctx)]
        else:  # as Ollama: a generation that reaches the end of the context shifts it (num_keep)
            args += ["--context-shift"]
        if self.prompt_only and not self.embedding:
            args += ["--chat-template", PROMPT_ONLY_TEMPLATE]
        if self.projector is not None:
            args += ["--mmproj", str(self.projector)]
        ngl = self.load.num_gpu if self.load.num_gpu is not None else self.n_gpu_layers
        if ngl is not None:
            args += ["--n-gpu-layers", str(ngl)]
        if self.rpc:
            args += ["--rpc", ",".join(self.rpc)]
            if len(self.tensor_split) > 1:
                args += ["--tensor-split", ",".join(f"{x:g}" for x in self.tensor_split)]
        if self.load.main_gpu is not None:
            args += ["--main-gpu", str(self.load.main_gpu)]
        if self.load.num_batch is not None:
            args += ["--batch-size", str(max(self.load.num_batch, self.num_parallel))]
        if self.load.use_mmap is False:
            args += ["--no-mmap"]
        threads = self.load.num_thread or self.threads
        if threads:
            args += ["--threads", str(threads)]
        args += ["--flash-attn", "on" if self.flash_attention else "off"]
        for kv in self.kv_overrides:
            args += ["--override-kv", kv]
        if self.flash_attention and self.kv_cache_type != "f16":
            args += ["--cache-type-k", self.kv_cache_type, "--cache-type-v", self.kv_cache_type]
        return args


def request_context(facts: ModelFacts, requested: int | None, defaults: ModelDefaults,
                    settings: PlanSettings, grow: bool = False) -> int:
    """Context per request: num_ctx, else the model default, else OLLAMA_CONTEXT_LENGTH.

    ``grow``: the request needs more context than the model's runner has, so it reloads; the
    new runner gets the next power of two, so clients asking for ever more reload rarely.
    """
    ctx = requested or defaults.num_ctx or settings.context_length
    if grow:
        ctx = 1 << (ctx - 1).bit_length()
    if facts.train_ctx:
        ctx = min(ctx, facts.train_ctx)
    ctx = max(ctx, MIN_CTX)
    if facts.vision:
        ctx = max(ctx, VISION_MIN_CTX)
    return ctx


def forced_single(facts: ModelFacts, settings: PlanSettings) -> str | None:
    """Why this model must run one request at a time, or None."""
    if facts.embedding:
        return "embedding model"
    if facts.architecture in settings.single_slot_architectures:
        return f"model architecture {facts.architecture} does not currently support parallel requests"
    return None


def plan_candidates(model: str, path: Path, facts: ModelFacts, settings: PlanSettings,
                    defaults: ModelDefaults, ctx: int, load: LoadOptions,
                    projector: Path | None = None) -> tuple[RunnerPlan, ...]:
    """The plans a new runner may use, best first; the scheduler takes the first that fits.

    With auto parallelism (OLLAMA_NUM_PARALLEL unset or 0) that is 4 slots, then 1.
    """
    notes: tuple[str, ...] = ()
    forced = forced_single(facts, settings)
    configured = defaults.num_parallel or settings.num_parallel
    if forced:
        choices = [1]
        if configured != 1:
            notes = (forced,)
    elif configured >= 1:
        choices = [configured]
    else:
        choices = [AUTO_PARALLEL, 1]
    # a context_length of 2^32-1 makes llama-server's slots -1 tokens long: it aborts on every request
    overrides = (f"{facts.architecture}.context_length=int:{facts.train_ctx}",) if facts.context_clamped else ()
    plans = []
    for n in choices:
        est = estimate_memory(facts, n, ctx, _effective_kv(settings),
                              flash_attention=settings.flash_attention)
        plans.append(RunnerPlan(
            model=model, path=path, num_parallel=n, ctx=ctx, load=load, projector=projector,
            embedding=facts.embedding, kv_cache_type=_effective_kv(settings),
            flash_attention=settings.flash_attention, threads=settings.threads, send_ahead=settings.send_ahead,
            estimate=est.total, detail=est, notes=notes, kv_overrides=overrides,
            prompt_only=not facts.embedding and not facts.chat_template,
        ))
    return tuple(plans)


def _effective_kv(settings: PlanSettings) -> str:
    # llama.cpp quantizes the V cache only with flash attention; Ollama ignores the type without it
    return settings.kv_cache_type if settings.flash_attention else "f16"
