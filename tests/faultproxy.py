"""A fault-injecting TCP proxy for HTTP/1.1 on 127.0.0.1, between s3fs and the S3 server (asyncio, in a thread).

Every client connection gets its own upstream connection. Requests (client -> server) are parsed just enough to
know where each one ends (headers, then Content-Length or chunked bodies); replies are piped back untouched. A
request that matches an armed rule gets that rule's fault instead of normal service:

    reset        forward the headers and half of the body, then cut both connections (RST)
    status:N     answer N (500, 503, ...) with an S3 error body without forwarding the request
    stall:S      swallow the request and answer nothing for S seconds, then close (a read timeout)
    drop_reply   forward the whole request, let the server act on it, and cut the client off before the reply
    call         forward the request normally after running the rule's callback (e.g. kill the server)

    with FaultProxy(("127.0.0.1", 8333)) as proxy:
        proxy.arm("PUT", "adapter_model", "reset", times=1)
        ... use proxy.endpoint_url ...
        assert proxy.injected == [("PUT", "/bucket/run/step-00000001/adapter_model.safetensors", "reset")]
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Rule:
    method: str
    path: re.Pattern
    action: str
    times: int | None  # None: every matching request
    callback: Callable[[], None] | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        live = self.times is None or self.hits < self.times
        return live and method == self.method and bool(self.path.search(path))


@dataclass
class Request:
    method: str
    path: str
    head: bytes
    body_parts: list[bytes] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.injected: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.port = 0

    # ------------------------------------------------------------------------------------------ control

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(
        self,
        method: str,
        path_regex: str,
        action: str,
        *,
        times: int | None = 1,
        callback: Callable[[], None] | None = None,
    ) -> Rule:
        rule = Rule(method.upper(), re.compile(path_regex), action, times, callback)
        with self._lock:
            self.rules.append(rule)
        return rule

    def disarm(self) -> None:
        with self._lock:
            self.rules.clear()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):  # a connection that would not end: stop anyway, keep the test's error
            done.result(10)
        # (stopped from here, once the shutdown's result is in: a loop stopped by the coroutine itself never ran the
        # callback that hands its result over, and every exit waited the whole 10 s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------ serving

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    self.injected.append((method, path, rule.action))
                    return rule
        return None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client_w)
            return
        pipe = asyncio.ensure_future(_pipe(up_r, client_w))
        try:
            while True:
                request = await _read_head(client_r)
                if request is None:
                    break
                rule = self._rule_for(request.method, request.path)
                action = rule.action if rule else "forward"
                if rule and rule.callback:
                    rule.callback()
                if action in ("forward", "call"):
                    up_w.write(request.head)
                    await _copy_body(client_r, request, up_w)
                    await up_w.drain()
                elif action == "reset":
                    up_w.write(request.head)
                    await _copy_body(client_r, request, up_w, fraction=0.5)
                    await up_w.drain()
                    _reset(client_w)
                    _reset(up_w)
                    break
                elif action.startswith("status:"):
                    await _copy_body(client_r, request, None)
                    pipe.cancel()
                    client_w.write(_error_reply(int(action.split(":")[1])))
                    await client_w.drain()
                    break
                elif action.startswith("stall:"):
                    await _copy_body(client_r, request, None)
                    pipe.cancel()
                    await asyncio.sleep(float(action.split(":")[1]))
                    _reset(client_w)
                    break
                elif action == "drop_reply":
                    pipe.cancel()
                    up_w.write(request.head)
                    await up_w.drain()
                    if (_header(request.head, "expect") or "").lower() == "100-continue":
                        client_w.write(await up_r.readuntil(b"\r\n\r\n"))  # relay "100 Continue"
                    await _copy_body(client_r, request, up_w)
                    await up_w.drain()
                    await up_r.read(65536)  # the server has acted on it and replied; the client never hears
                    _reset(client_w)
                    break
                else:
                    raise ValueError(f"unknown fault action {action!r}")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except asyncio.CancelledError:  # the proxy is shutting down: end this connection quietly
            pass
        finally:
            pipe.cancel()
            for w in (client_w, up_w):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server -> client, untouched. When the server's side ends (it closed or died), the client's connection is
    cut as well, as it would be without the proxy in between."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except asyncio.CancelledError:  # the proxy answers this client itself now
        return
    except (ConnectionError, OSError):
        pass
    _reset(writer)


async def _read_head(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
    return Request(method, path, head)


def _header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def _copy_body(
    reader: asyncio.StreamReader, request: Request, writer: asyncio.StreamWriter | None, fraction: float = 1.0
) -> None:
    """Read the request body; pass it (or its first ``fraction``) on to ``writer``. A request that waits for
    "100 Continue" and is not forwarded has no body to read: its client sends none before that answer."""
    if writer is None and (_header(request.head, "expect") or "").lower() == "100-continue":
        return
    length = _header(request.head, "content-length")
    if length is not None:
        body = await reader.readexactly(int(length))
        if writer is not None:
            writer.write(body[: int(len(body) * fraction)])
        return
    if (_header(request.head, "transfer-encoding") or "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:  # the last chunk, then optional trailers
                trailer = chunk
                while trailer != b"\r\n":
                    trailer = await reader.readuntil(b"\r\n")
                    chunk += trailer if trailer != b"\r\n" else b""
            if writer is not None and fraction >= 1.0:
                writer.write(size_line + chunk)
            if size == 0:
                return


def _error_reply(status: int) -> bytes:
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    code = {500: "InternalError", 503: "SlowDown"}.get(status, "InternalError")
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n{body}"
    ).encode()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
