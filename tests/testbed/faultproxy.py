"""A fault-injecting HTTPS reverse proxy on loopback, in front of one test-bed service.

It terminates TLS (with the run's server certificate, or another one to test a CA
mismatch), forwards to the real service over TLS, and applies the current fault to
matching requests:

- ``None``: pass through;
- ``("status", 503)``: answer with that status;
- ``("reset", n)``: send the headers and ``n`` body bytes, then reset the connection;
- ``("slow", bytes_per_second)``: throttle the body;
- ``("extra", n)``: send ``n`` bytes more than the real body (with a matching length);
- ``("drop_property", name)``: remove a property from JSON image metadata.

``requests`` counts every request it saw (for request-count benchmarks).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class FaultProxy:
    def __init__(
        self, upstream: str, ca: Path, cert: Path, key: Path, match: str = "/v2/images"
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.ca = ca
        self.fault: tuple[str, Any] | None = None
        self.match = match
        self.requests: list[str] = []
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
        fault = self.fault if h.path.startswith(self.match) else None
        if fault and fault[0] in ("reset", "slow", "extra") and not h.path.endswith("/file"):
            fault = None  # stream faults hit downloads only
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if fault and fault[0] == "status":
            h.send_response(int(fault[1]))
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
        sent = 0
        try:
            for chunk in data_iter:
                if fault and fault[0] == "reset" and sent + len(chunk) >= int(fault[1]):
                    h.wfile.write(chunk[: max(0, int(fault[1]) - sent)])
                    h.wfile.flush()
                    self._reset(h)
                    return
                if fault and fault[0] == "slow":
                    for i in range(0, len(chunk), 4096):
                        h.wfile.write(chunk[i : i + 4096])
                        time.sleep(4096 / float(fault[1]))
                else:
                    h.wfile.write(chunk)
                sent += len(chunk)
            if fault and fault[0] == "extra":
                h.wfile.write(b"\0" * int(fault[1]))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        finally:
            conn.close()
        h.close_connection = True

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        sock: socket.socket = h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        sock.close()
