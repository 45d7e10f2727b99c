"""The `Host` a request names must be the address it reached the server on (or a name the
operator allowed with `edje serve --allowed-host`): a web page whose domain was re-pointed at
127.0.0.1 (DNS rebinding) sends its own name as `Host`, so it can't read a local service's
search results or thumbnails."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

LOOPBACK_NAMES = ("localhost",)


class HostCheck:
    """ASGI middleware: refuses (400, `{"message"}`) a request whose `Host` names neither the
    local address the connection came in on (`localhost` too when that is a loopback address)
    nor one of `allowed` (`*`: any). A request without `Host` (HTTP/1.0, no browser) passes."""

    def __init__(self, app, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {name.lower().rstrip(".") for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or ()).get(b"host")
            name = host_name(host.decode("latin-1")) if host is not None else None
            if name is not None and not self.accepts(name, scope.get("server")):
                await _refuse(send, name, scope.get("server"))
                return
        await self.app(scope, receive, send)

    def accepts(self, name: str, server: tuple[str, int] | None) -> bool:
        if "*" in self.allowed or name in self.allowed:
            return True
        local = (server or ("",))[0]
        if name == local.lower():
            return True
        return name in LOOPBACK_NAMES and _is_loopback(local)


def host_name(header: str) -> str:
    """`Host` without its port, lowercase: `[::1]:8000` -> `::1`, `Example.org.:80` ->
    `example.org`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def _refuse(send, name: str, server: tuple[str, int] | None) -> None:
    local = (server or ("this server's address",))[0]
    message = (
        f"Host {name!r} is not the address this server was reached on ({local}); "
        "start edje serve with --allowed-host NAME to accept requests sent to NAME."
    )
    body = json.dumps({"message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
