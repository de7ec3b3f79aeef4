"""HTTP: Ollama's native routes, model management, the OpenAI routes, embeddings, the
request/response translation, the relay of llama-server's events into NDJSON, and the
middlewares (CORS, API key, request log). ``common`` holds what every route family shares;
route modules import it and never each other; ``routes.make_app`` only registers. May import
every package below it (service, sched, runner, memory, models) and ``ollamad.settings``."""
