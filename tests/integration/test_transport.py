"""provisioner.transport against a real TLS server on loopback: a connection that breaks is
sent again (repeatable requests only, a bounded number of times) and named as such; a
certificate that does not verify is never sent again and is named as such."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from keystoneauth1 import session as ksa_session

from provisioner import transport
from provisioner.cloud import translate
from provisioner.errors import ServiceUnavailableError
from tests.testbed.controlplane import make_ca

pytestmark = pytest.mark.integration

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"


class Server:
    """Answers each connection as the next entry of ``script`` says (the last one repeats):

    - ``ok``: answer one request, then close;
    - ``ok-then-drop``: answer one request keeping the connection alive, read the next one
      and close without answering (what a server closing an idle kept-alive connection
      does to a client that reuses it at that moment);
    - ``drop``: read the request and close without answering;
    - ``handshake-drop``: read the TLS ClientHello and close (what the client sees when a
      server drops a new connection before it is established).
    """

    def __init__(self, cert: Path, key: Path, script: list[str]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.script = script
        self.accepted = 0  # TCP connections
        self.requests: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_request(self, conn: ssl.SSLSocket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return ""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        need = int(length.group(1)) if length else 0
        while len(body) < need:
            body += conn.recv(4096)
        line = head.split(b"\r\n", 1)[0].decode()
        self.requests.append(line)
        return line

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            action = self.script[min(self.accepted, len(self.script) - 1)]
            self.accepted += 1
            if action == "handshake-drop":
                raw.recv(4096)  # the ClientHello, then nothing: an EOF in the handshake
                raw.close()
                continue
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # the client refused our certificate
                continue
            try:
                if not self._read_request(conn):
                    continue
                if action == "ok":
                    conn.sendall(OK + b"Connection: close\r\n\r\nok")
                elif action == "ok-then-drop":
                    conn.sendall(OK + b"Connection: keep-alive\r\n\r\nok")
                    self._read_request(conn)
            except OSError:
                pass
            finally:
                conn.close()  # no close_notify: the client sees an unexpected EOF

    def url(self, path: str = "/v3/things") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])


@pytest.fixture
def serve(tls: tuple[Path, Path, Path]) -> Iterator[object]:
    servers: list[Server] = []

    def start(*script: str) -> Server:
        servers.append(Server(tls[1], tls[2], list(script)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def node_session(ca: Path) -> ksa_session.Session:
    """A keystoneauth session made the way the node and the operator CLI make theirs."""
    sess = ksa_session.Session(verify=str(ca), timeout=10)
    transport.install(sess.session)
    return sess


def test_a_get_whose_connection_breaks_is_sent_again(serve, tls) -> None:  # type: ignore[no-untyped-def]
    server = serve("drop", "ok")
    r = node_session(tls[0]).get(server.url())
    assert r.status_code == 200 and r.text == "ok"
    assert server.accepted == 2 and server.requests == ["GET /v3/things HTTP/1.1"] * 2


def test_a_kept_alive_connection_closed_as_it_is_reused_costs_nothing(serve, tls) -> None:  # type: ignore[no-untyped-def]
    server = serve("ok-then-drop", "ok")
    sess = node_session(tls[0])
    assert sess.get(server.url()).status_code == 200
    assert sess.get(server.url()).status_code == 200  # the pooled connection breaks
    assert server.accepted == 2 and len(server.requests) == 3


def test_a_connection_that_keeps_breaking_is_unreachable_not_a_bad_certificate(  # type: ignore[no-untyped-def]
    serve, tls
) -> None:
    server = serve("drop")
    with pytest.raises(ServiceUnavailableError) as info:
        with translate("keystone", "the node's project"):
            node_session(tls[0]).get(server.url())
    assert server.accepted == transport.ATTEMPTS
    message = str(info.value)
    assert "unreachable (the connection broke: " in message
    assert "verification" not in message and "CA bundle" not in (info.value.hint or "")


def test_a_post_is_not_sent_twice_but_a_token_request_is(serve, tls) -> None:  # type: ignore[no-untyped-def]
    server = serve("drop", "ok")
    with pytest.raises(ServiceUnavailableError, match="the connection broke"):
        with translate("keystone", "create the bootstrap credential"):
            node_session(tls[0]).post(server.url("/v3/users/u/application_credentials"), json={})
    assert server.accepted == 1
    server = serve("drop", "ok")
    r = node_session(tls[0]).post(server.url("/v3/auth/tokens"), json={"auth": {}})
    assert r.status_code == 200 and server.accepted == 2


def test_a_post_whose_connection_broke_in_the_handshake_is_sent_again(  # type: ignore[no-untyped-def]
    serve, tls
) -> None:
    """The request cannot have reached the server: even a POST is sent again."""
    server = serve("handshake-drop", "ok")
    url = server.url("/v3/users/u/application_credentials")
    r = node_session(tls[0]).post(url, json={})
    assert r.status_code == 200 and server.accepted == 2
    assert server.requests == ["POST /v3/users/u/application_credentials HTTP/1.1"]
    server = serve("handshake-drop")
    with pytest.raises(ServiceUnavailableError, match=r"the connection broke: SSLEOFError"):
        with translate("keystone", "create the bootstrap credential"):
            node_session(tls[0]).post(server.url("/v3/users/u/application_credentials"), json={})
    assert server.accepted == transport.ATTEMPTS


def test_a_streamed_body_is_not_sent_twice(serve, tls) -> None:  # type: ignore[no-untyped-def]
    server = serve("drop", "ok")
    with pytest.raises(ServiceUnavailableError, match="the connection broke"):
        with translate("glance", "upload"):
            node_session(tls[0]).put(server.url(), data=iter([b"a" * 10]))
    assert server.accepted == 1


def test_a_certificate_that_does_not_verify_is_said_and_never_retried(  # type: ignore[no-untyped-def]
    serve, tls, tmp_path: Path
) -> None:
    other_ca = make_ca(tmp_path / "other", ["127.0.0.1"])[0]
    server = serve("ok")
    with pytest.raises(ServiceUnavailableError) as info:
        with translate("keystone"):
            node_session(other_ca).get(server.url())
    assert server.accepted == 1
    assert "TLS verification failed (certificate verify failed: " in str(info.value)
    assert "CA bundle" in (info.value.hint or "")
