"""ollamad: an Ollama-compatible daemon over llama.cpp's llama-server."""

__version__ = "0.1.0"
