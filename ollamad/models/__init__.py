"""Models and what is known about them without running them: the catalog over a folder of
GGUF files and Ollama's store, the GGUF header reader, model facts, Modelfiles, per-model
settings, request options, the capabilities shown to clients, and the pure plan of how to
run one (slots, context, memory estimate). The plan and the estimate live here, not in sched
or memory, because the runner (argv), the accountant and the scheduler all read them. The
bottom layer: imports nothing of ollamad but ``ollamad.settings``/``ollamad.durations``."""
