"""Who may talk to the API: CORS as Ollama does it, optional bearer auth, request logging.

CORS follows Ollama (gin-contrib/cors with wildcards and browser extensions): origins on
localhost, 127.0.0.1 and 0.0.0.0 (any port, http or https), app://, file://, tauri://,
vscode-webview:// and vscode-file:// are allowed, plus each entry of OLLAMA_ORIGINS ("*"
allows all). A request from any other origin is refused with 403.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

log = structlog.get_logger("ollamad.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
APP_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
EXTENSION_SCHEMES = ("chrome-extension://", "safari-extension://", "moz-extension://", "ms-browser-extension://")
ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
ALLOW_HEADERS = ("Authorization,Content-Type,User-Agent,Accept,X-Requested-With,OpenAI-Beta,x-stainless-arch,"
                 "x-stainless-async,x-stainless-custom-poll-interval,x-stainless-helper-method,x-stainless-lang,"
                 "x-stainless-os,x-stainless-package-version,x-stainless-poll-helper,x-stainless-retry-count,"
                 "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")
OPEN_PATHS = frozenset({"/", "/api/version"})  # health-style routes need no token


def allowed_origins(extra: Iterable[str]) -> tuple[str, ...]:
    """OLLAMA_ORIGINS first, then Ollama's defaults."""
    local = [f"{scheme}://{host}{port}" for host in LOCAL_HOSTS for scheme in ("http", "https")
             for port in ("", ":*")]
    return (*extra, *local, *APP_ORIGINS)


def origin_allowed(origin: str, patterns: Iterable[str]) -> bool:
    if origin.startswith(EXTENSION_SCHEMES):
        return True
    for p in patterns:
        if p == "*" or p == origin:
            return True
        if p.count("*") == 1:
            head, tail = p.split("*")
            if len(origin) >= len(head) + len(tail) and origin.startswith(head) and origin.endswith(tail):
                return True
    return False


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(body=json.dumps({"error": message}).encode() + b"\n", status=status,
                        content_type="application/json")


def cors_middleware(origins: Iterable[str]) -> Middleware:
    patterns = allowed_origins(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if not origin or origin in (f"http://{request.host}", f"https://{request.host}"):
            return await handler(request)  # not a cross-origin request
        if not origin_allowed(origin, patterns):
            return _refuse(403, f"origin {origin!r} is not allowed (see OLLAMA_ORIGINS)")
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                **headers, "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "43200"})
        # headers must be on the response before a stream starts: set them when it is prepared
        request["cors_headers"] = headers
        resp = await handler(request)
        if not resp.prepared:
            resp.headers.update(headers)
        return resp

    return cors


async def add_cors_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """on_response_prepare hook: streamed replies get their CORS headers too."""
    resp.headers.update(request.get("cors_headers", {}))


def auth_middleware(api_key: str) -> Middleware:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)
        # aiohttp keeps bytes that are not UTF-8 as surrogates: compare them as bytes, not a 500
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return _refuse(401, "unauthorized: this server needs 'Authorization: Bearer <OLLAMAD_API_KEY>'")
        return await handler(request)

    return auth


def request_log_middleware(with_bodies: bool) -> Middleware:
    """One line per API request; bodies (prompts) only when OLLAMAD_LOG_REQUESTS is on."""

    @web.middleware
    async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.monotonic()
        extra = {}
        if with_bodies and request.can_read_body:
            extra["body"] = (await request.read()).decode("utf-8", errors="replace")
        resp = await handler(request)
        log.debug("request", method=request.method, path=request.path, status=resp.status,
                  seconds=round(time.monotonic() - t0, 3))
        if with_bodies:
            log.info("request body", method=request.method, path=request.path, **extra)
        return resp

    return request_log
