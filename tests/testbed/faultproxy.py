"""A fault-injecting HTTPS reverse proxy on loopback, in front of one test-bed service.

It terminates TLS (with the run's server certificate, or another one to test a CA
mismatch), forwards to the real service over TLS, and applies the current fault to
matching requests:

- ``None``: pass through;
- ``("status", 503)``: answer with that status;
- ``("reset", n)``: send the headers and ``n`` body bytes, then reset the connection;
- ``("slow", bytes_per_second)``: throttle the body;
- ``("slow_reset", (bytes_per_second, n))``: throttle the body, reset after ``n`` bytes;
- ``("extra", n)``: send ``n`` bytes more than the real body (with a matching length);
- ``("drop_property", name)``: remove a property from JSON image metadata.

``requests`` counts every request it saw (for request-count benchmarks); ``seen`` keeps one
``Seen`` per request with its timing, status, bytes sent and the token it carried. The token
stays in memory only, out of every repr, and is compared by its digest.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
STREAM_FAULTS = ("reset", "slow", "extra", "slow_reset")


@dataclass
class Seen:
    """One request through the proxy; times are wall-clock (``time.time()``)."""

    method: str
    path: str
    range: str | None
    started: float
    token_digest: str | None
    token: str | None = field(default=None, repr=False)
    status: int | None = None
    sent: int = 0
    ended: float | None = None
    cut: bool = False


class FaultProxy:
    def __init__(
        self, upstream: str, ca: Path, cert: Path, key: Path, match: str = "/v2/images"
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.ca = ca
        self.fault: tuple[str, Any] | None = None
        self.match = match
        self.requests: list[str] = []
        self.seen: list[Seen] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            def do_PUT(self) -> None:
                proxy.handle(self)

            def do_POST(self) -> None:
                proxy.handle(self)

            def do_PATCH(self) -> None:
                proxy.handle(self)

            def do_DELETE(self) -> None:
                proxy.handle(self)

            def do_HEAD(self) -> None:
                proxy.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append(f"{h.command} {h.path}")
        token = h.headers.get("X-Auth-Token")
        seen = Seen(
            h.command,
            h.path,
            h.headers.get("Range"),
            time.time(),
            hashlib.sha256(token.encode()).hexdigest()[:16] if token else None,
            token,
        )
        self.seen.append(seen)
        try:
            self._handle(h, seen)
        finally:
            seen.ended = time.time()

    def _handle(self, h: BaseHTTPRequestHandler, seen: Seen) -> None:
        fault = self.fault if h.path.startswith(self.match) else None
        if fault and fault[0] in STREAM_FAULTS and not h.path.endswith("/file"):
            fault = None  # stream faults hit downloads only
        kind = fault[0] if fault else None
        arg: Any = fault[1] if fault else None
        rate: float | None = None
        cut: int | None = None
        if kind == "slow":
            rate = float(arg)
        elif kind == "reset":
            cut = int(arg)
        elif kind == "slow_reset":
            rate, cut = float(arg[0]), int(arg[1])
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if fault and fault[0] == "status":
            # ("status", 503) or ("status", (503, {"Retry-After": "3"}))
            code, extra = (fault[1], {}) if isinstance(fault[1], int) else fault[1]
            seen.status = int(code)
            h.send_response(int(code))
            for k, v in extra.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        ctx = ssl.create_default_context(cafile=str(self.ca))
        conn = http.client.HTTPSConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port, context=ctx, timeout=60
        )
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        seen.status = resp.status
        data_iter = iter(lambda: resp.read(65536), b"")
        if fault and fault[0] == "drop_property" and "json" in resp.getheader("Content-Type", ""):
            doc = json.loads(resp.read())
            doc.pop(fault[1], None)
            payload = json.dumps(doc).encode()
            data_iter = iter([payload])
            total: int | None = len(payload)
        else:
            cl = resp.getheader("Content-Length")
            total = int(cl) if cl is not None else None
        if fault and fault[0] == "extra" and total is not None:
            total += int(fault[1])
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                h.send_header(k, v)
        if total is not None:
            h.send_header("Content-Length", str(total))
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for chunk in data_iter:
                if cut is not None and seen.sent + len(chunk) >= cut:
                    self._write(h, seen, chunk[: max(0, cut - seen.sent)], rate)
                    h.wfile.flush()
                    seen.cut = True
                    self._reset(h)
                    return
                self._write(h, seen, chunk, rate)
            if fault and fault[0] == "extra":
                h.wfile.write(b"\0" * int(fault[1]))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        finally:
            conn.close()
        h.close_connection = True

    @staticmethod
    def _write(h: BaseHTTPRequestHandler, seen: Seen, data: bytes, rate: float | None) -> None:
        if rate is None:
            h.wfile.write(data)
            seen.sent += len(data)
            return
        for i in range(0, len(data), 4096):
            piece = data[i : i + 4096]
            h.wfile.write(piece)
            seen.sent += len(piece)
            time.sleep(len(piece) / rate)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        sock: socket.socket = h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        sock.close()
