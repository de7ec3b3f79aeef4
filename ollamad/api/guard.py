"""Who may talk to the API: Host names on loopback, CORS as Ollama does it, optional bearer
auth, request logging.

DNS rebinding: a web page can point its own name at 127.0.0.1 and then talk to the daemon as
a same-origin page. On a loopback connection only local Host names are accepted, with
Ollama's rules (allowedHostsMiddleware): no Host, IP literals that are loopback, private,
unspecified or this machine's, ``localhost``, this machine's hostname, and names under
.localhost, .local and .internal; plus each entry of OLLAMAD_ALLOWED_HOSTS (``*.example.com``
wildcards, ``*`` for any). Any other Host gets 403.

CORS follows Ollama (gin-contrib/cors with wildcards and browser extensions): origins on
localhost, 127.0.0.1 and 0.0.0.0 (any port, http or https), app://, file://, tauri://,
vscode-webview:// and vscode-file:// are allowed, plus each entry of OLLAMA_ORIGINS ("*"
allows all). A request from any other origin is refused with 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable

import psutil
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
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_ALWAYS_LOCAL = frozenset({"", "localhost", "127.0.0.1", "::1"})  # what host_allowed would find, unparsed
_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name part of a Host header: no port, no brackets, lower case, no final dot."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":")[0]
    return h.removesuffix(".")


def _local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_private or ip.is_unspecified:
        return True
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return str(ip) in mine


def host_allowed(header: str, extra: Iterable[str] = ()) -> bool:
    """True if a loopback connection may use this Host header (see the module's text)."""
    name = host_name(header)
    for pattern in extra:
        p = pattern.strip().lower()
        if p == "*" or p == name or (p.startswith("*.") and name.endswith(p[1:])):
            return True
    if name in _ALWAYS_LOCAL or name == socket.gethostname().lower():
        return True
    try:
        return _local_address(ipaddress.ip_address(name))
    except ValueError:
        return name.endswith(LOCAL_SUFFIXES)


def _on_loopback(request: web.Request) -> bool:
    """The connection came in on a loopback address (always so when bound to one)."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not isinstance(sock, tuple) or not sock:
        return False
    if sock[0] in _LOOPBACK:  # the usual case, without parsing it
        return True
    try:
        ip = ipaddress.ip_address(str(sock[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_middleware(extra: Iterable[str]) -> Middleware:
    """403 for a loopback connection whose Host is not a local name (DNS rebinding)."""
    allowed = tuple(extra)

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Host", "")
        if _on_loopback(request) and not host_allowed(header, allowed):
            log.warning("refused a request for another host name", host=header[:100], path=request.path)
            return _refuse(403, f"host {header[:100]!r} is not allowed on this address (see OLLAMAD_ALLOWED_HOSTS)")
        return await handler(request)

    return check_host


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


def body_log_middleware() -> Middleware:
    """OLLAMAD_LOG_REQUESTS: each request's body (prompts) logged too; installed only then
    (api/reqlog.py writes every request's own line)."""

    @web.middleware
    async def body_log(request: web.Request, handler: Handler) -> web.StreamResponse:
        extra = {}
        if request.can_read_body:
            extra["body"] = (await request.read()).decode("utf-8", errors="replace")
        resp = await handler(request)
        log.info("request body", method=request.method, path=request.path, **extra)
        return resp

    return body_log
