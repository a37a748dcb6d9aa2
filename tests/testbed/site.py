"""A service on a QEMU node's outer network, which the node's guest must reach.

A node booted by :class:`tests.testbed.qemuvm.HostVm` is on QEMU's user network, where
10.0.2.2 is this machine's loopback: :class:`SiteService` listens on 127.0.0.1 and a guest
bridged onto that network reaches it at ``url``. It answers every GET with 200 and keeps
the paths it was asked for (a tiny guest built with ``net_url`` asks ``/<marker>/<its
address>``, tests/testbed/guest.py).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# this machine's loopback, as a guest on QEMU's user network sees it
HOST_FROM_USER_NET = "10.0.2.2"


class SiteService:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://{HOST_FROM_USER_NET}:{port}"
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def record(self, path: str) -> None:
        with self._lock:
            self.paths.append(path)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The first path asked that starts with ``prefix``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [p for p in self.paths if p.startswith(prefix)]
            if found:
                return found[0]
            time.sleep(1)
        raise AssertionError(f"nothing asked for {prefix}* within {timeout:.0f} s: {self.paths}")


@contextmanager
def site_service() -> Iterator[SiteService]:
    """Serve on 127.0.0.1 (a port the kernel picks) until the block ends."""
    holder: list[SiteService] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            holder[0].record(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(SiteService(server.server_address[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
