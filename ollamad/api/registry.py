"""Pulling from an Ollama-compatible registry, guarded against a hostile or broken one.

A pull names any host, so it must not become a way to reach the daemon's own network: the
targets of the request and of every redirect must be public addresses unless listed in
OLLAMAD_PULL_ALLOW (hosts, IP addresses or networks; ``*`` allows all). Host names are
checked on the addresses they resolve to, at connect time, so a name cannot be rebound to
a private address between the check and the connection. Manifests are validated, declared
sizes enforced, model files checked as GGUF before they are stored, connects and reads time
out, and the client gets generic error texts (details go to the log).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ollamad.api.common import ApiError, AppContext
from ollamad.models import store
from ollamad.models.ggufmeta import GGUFError, read_gguf
from ollamad.models.options import check_params

log = structlog.get_logger("ollamad.pull")
Progress = AsyncIterator[dict[str, Any]]
ACCEPT = f"{store.MANIFEST_TYPE}, application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST = 1 << 20  # bytes
MAX_REDIRECTS = 5
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """A pull target (or a redirect) points at an address OLLAMAD_PULL_ALLOW does not allow."""


@dataclass(frozen=True)
class PullPolicy:
    """Which hosts a pull may reach: public addresses, plus what OLLAMAD_PULL_ALLOW lists."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[_Network, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> PullPolicy:
        hosts, networks, everything = set(), [], False
        for entry in entries:
            e = entry.strip().lower().strip("[]")
            if e == "*":
                everything = True
                continue
            try:
                networks.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                hosts.add(e)
        return cls(frozenset(hosts), tuple(networks), everything)

    def host_allowed(self, host: str) -> bool:
        return self.everything or host.lower().strip("[]") in self.hosts

    def address_allowed(self, address: str) -> bool:
        ip: _Address = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.everything or any(ip in net for net in self.networks):
            return True
        return ip.is_global and not ip.is_multicast

    def check(self, host: str, addresses: Iterable[str]) -> None:
        if self.host_allowed(host):
            return
        for a in addresses:
            if not self.address_allowed(a):
                raise Refused(f"{host} is a private, loopback or link-local address ({a}); "
                              "list it in OLLAMAD_PULL_ALLOW to pull from it")


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing names that resolve to addresses the policy does not allow."""

    def __init__(self, policy: PullPolicy) -> None:
        self.policy = policy
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        addresses = await self.inner.resolve(host, port, family)
        self.policy.check(host, [a["host"] for a in addresses])
        return addresses

    async def close(self) -> None:
        await self.inner.close()


def pull_session(policy: PullPolicy, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
        total=None, sock_connect=timeout, sock_read=timeout))


async def _get(session: aiohttp.ClientSession, policy: PullPolicy, url: URL,
               headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    """GET ``url``, following redirects only to allowed places (an IP literal skips the resolver)."""
    for _ in range(MAX_REDIRECTS + 1):
        if url.scheme not in ("http", "https") or not url.host:
            raise Refused(f"not an http(s) URL: {url.scheme}:")
        try:
            literal = ipaddress.ip_address(url.host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            policy.check(url.host, [str(literal)])
        resp = await session.get(url, headers=headers, allow_redirects=False)
        location = resp.headers.get("Location")
        if resp.status in (301, 302, 303, 307, 308) and location:
            resp.release()
            url = resp.url.join(URL(location))
            continue
        return resp
    raise Refused("too many redirects")


def _failure(what: str, e: BaseException) -> ApiError:
    """A generic error for the client; the detail goes to the log."""
    if isinstance(e, ApiError):
        return e
    log.warning("pull failed", step=what, error=str(e) or type(e).__name__)
    if isinstance(e, Refused):
        return ApiError(403, f"{what}: the registry's address is not allowed (see OLLAMAD_PULL_ALLOW)")
    if isinstance(e, TimeoutError):
        return ApiError(504, f"{what}: the registry did not answer in time")
    return ApiError(502, f"{what}: could not reach the registry")


async def _read_manifest(session: aiohttp.ClientSession, policy: PullPolicy, url: URL) -> bytes:
    resp = await _get(session, policy, url, {"Accept": ACCEPT})
    async with resp:
        if resp.status == 404:
            raise ApiError(404, "pull model manifest: file does not exist")
        if resp.status != 200:
            raise ApiError(502, f"pull model manifest: registry answered {resp.status}")
        raw = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            raw += chunk
            if len(raw) > MAX_MANIFEST:
                raise ApiError(502, "pull model manifest: the manifest is too large")
    return bytes(raw)


async def pull_steps(ctx: AppContext, name: store.Name, insecure: bool) -> Progress:
    """The steps of a pull, as Ollama reports them."""
    root = ctx.catalog.folder
    policy = PullPolicy.parse(ctx.settings.pull_allow)
    base = URL(f"{'http' if insecure else 'https'}://{name.host}/v2/{name.namespace}/{name.model}")
    async with pull_session(policy, ctx.settings.pull_timeout) as session:
        yield {"status": "pulling manifest"}
        try:
            raw = await _read_manifest(session, policy, base / "manifests" / name.tag)
        except (aiohttp.ClientError, TimeoutError, Refused, ApiError) as e:
            raise _failure("pull model manifest", e) from None
        try:
            manifest = store.check_manifest(name, name.manifest_path(root), raw)
        except store.StoreError as e:
            raise ApiError(502, f"pull model manifest: {e}") from None
        blobs = [*([manifest.config] if manifest.config else []), *manifest.layers]
        for layer in blobs:
            async for step in _pull_blob(ctx, session, policy, base / "blobs" / layer.digest, layer):
                yield step
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    await anyio.to_thread.run_sync(store.write_atomic, name.manifest_path(root), raw)
    await anyio.to_thread.run_sync(ctx.catalog.scan)
    yield {"status": "success"}


async def _pull_blob(ctx: AppContext, session: aiohttp.ClientSession, policy: PullPolicy, url: URL,
                     layer: store.Layer) -> Progress:
    path = store.blob_path(ctx.catalog.folder, layer.digest)
    status = f"pulling {layer.digest.split(':')[1][:12]}"
    if path.is_file():
        yield {"status": status, "digest": layer.digest, "total": layer.size, "completed": layer.size}
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.temp_beside(path, "partial")
    h, done, reported = hashlib.sha256(), 0, 0
    try:
        try:
            resp = await _get(session, policy, url)
            async with resp, await anyio.open_file(tmp, "wb") as f:
                if resp.status != 200:
                    raise ApiError(502, f"pull {layer.digest}: registry answered {resp.status}")
                async for chunk in resp.content.iter_chunked(1 << 20):
                    done += len(chunk)
                    if done > layer.size:
                        raise ApiError(502, f"pull {layer.digest}: larger than the manifest declares")
                    h.update(chunk)
                    await f.write(chunk)
                    if done - reported >= 1 << 20:
                        reported = done
                        yield {"status": status, "digest": layer.digest, "total": layer.size, "completed": done}
        except (aiohttp.ClientError, TimeoutError, Refused) as e:
            raise _failure(f"pull {layer.digest}", e) from None
        if done != layer.size:
            raise ApiError(502, f"pull {layer.digest}: {done} bytes, the manifest declares {layer.size}")
        if "sha256:" + h.hexdigest() != layer.digest:
            raise ApiError(502, f"digest mismatch for {layer.digest}: got sha256:{h.hexdigest()}")
        await anyio.to_thread.run_sync(_check_content, tmp, layer)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    yield {"status": status, "digest": layer.digest, "total": layer.size, "completed": done}


def _check_content(path: Any, layer: store.Layer) -> None:
    """What the catalog will read of a layer must be readable: GGUF files, the params object."""
    try:
        if layer.media_type in (store.MODEL, store.PROJECTOR):
            read_gguf(path)
        elif layer.media_type == store.PARAMS:
            check_params(json.loads(path.read_bytes()))
    except GGUFError as e:
        raise ApiError(502, f"pull {layer.digest}: {e}") from None
    except ValueError as e:
        raise ApiError(502, f"pull {layer.digest}: invalid params layer: {e}") from None
