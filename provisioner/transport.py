"""HTTP transport for the node and the operator: a broken connection is not a bad certificate.

keystoneauth reports every error of the TLS layer as ``SSLError``: a certificate that does
not verify, and a connection the server closed while the request was on its way (an
unexpected EOF). The two mean different things and are handled apart:

- a certificate that does not verify is never retried (:func:`verification_failed`);
- a connection that breaks (EOF, reset, the server gone mid-answer) is retried a bounded
  number of times, with a short random wait, for requests that are safe to repeat
  (:func:`repeatable`), and reported as the service being unreachable if it keeps breaking
  (:func:`connection_broke`); any other request (a ``POST``) only when the connection broke
  before the request could reach the server (:func:`never_sent`: in the TLS handshake).

A kept-alive connection that the server closes for being idle just as the client reuses it
breaks this way; a second attempt opens a new connection.
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

LOG = logging.getLogger(__name__)

ATTEMPTS = 3
"""How many times a repeatable request is sent when its connection breaks."""

# methods whose repetition changes nothing more than one request does (RFC 9110 9.2.2)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

_BROKEN = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every exception it carries: causes, contexts, ``reason`` and args.

    requests and urllib3 wrap the socket's error in two or three layers (``SSLError`` of
    ``MaxRetryError`` of urllib3's ``SSLError`` of ``ssl.SSLEOFError``), keystoneauth adds
    its own on top as the context.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 64:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        carried = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo.extend(c for c in carried if isinstance(c, BaseException))


def verification_failed(exc: BaseException) -> bool:
    """The peer's certificate did not verify (unknown issuer, expired, wrong name)."""
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc))


def connection_broke(exc: BaseException) -> bool:
    """The connection ended before the answer did; never true for a bad certificate."""
    if verification_failed(exc):
        return False
    return any(isinstance(e, _BROKEN) for e in _chain(exc))


def never_sent(exc: BaseException) -> bool:
    """The connection broke in the TLS handshake or while the request was being written, so
    the server cannot have acted on it: an EOF from the TLS layer. (requests reads a response
    with ragged EOFs suppressed: an EOF after the request was sent is "remote end closed
    connection", never an ``SSLEOFError``.)"""
    if verification_failed(exc):
        return False
    return any(isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError) for e in _chain(exc))


def root_cause(exc: BaseException) -> BaseException:
    """The socket or TLS error under the wrappers (``exc`` itself when there is none)."""
    for e in _chain(exc):
        if isinstance(e, (ssl.SSLError, *_BROKEN)) or (
            isinstance(e, OSError) and not isinstance(e, requests.RequestException)
        ):
            return e
    return exc


def describe(exc: BaseException) -> str:
    """One line on what went wrong underneath, e.g. "SSLEOFError: EOF occurred ..." or
    "certificate verify failed: unable to get local issuer certificate"."""
    cause = root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message or cause.reason}"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:120]}" if text else type(cause).__name__


def repeatable(request: requests.PreparedRequest) -> bool:
    """Whether sending ``request`` twice does no more than sending it once.

    Idempotent methods, and the token request (a second token replaces nothing), with a
    body that can be sent again (none, or bytes; never a stream that was read).
    """
    method = (request.method or "").upper()
    path = urlsplit(request.url or "").path
    if method not in IDEMPOTENT and not (method == "POST" and path.endswith("/auth/tokens")):
        return False
    return resendable(request)


def resendable(request: requests.PreparedRequest) -> bool:
    """The body can be sent again: none, or bytes; never a stream that was read."""
    return request.body is None or isinstance(request.body, bytes | str)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    LOG.info(
        "connection broke (%s), sending the request again (attempt %d of %d)",
        type(exc).__name__,
        state.attempt_number + 1,
        ATTEMPTS,
    )


class RetryingAdapter(requests.adapters.BaseAdapter):
    """Sends through ``inner`` (keystoneauth's keep-alive adapter) and repeats a repeatable
    request whose connection broke, at most :data:`ATTEMPTS` times in all."""

    def __init__(self, inner: requests.adapters.BaseAdapter, wait_max: float = 1.0) -> None:
        super().__init__()
        self.inner = inner
        self.wait_max = wait_max

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        kwargs = {
            "stream": stream,
            "timeout": timeout,
            "verify": verify,
            "cert": cert,
            "proxies": proxies,
        }
        if not resendable(request):
            return self.inner.send(request, **kwargs)
        # a repeatable request whenever its connection broke; any other only when it
        # cannot have reached the server
        again = connection_broke if repeatable(request) else never_sent
        retrying = Retrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.1, max=self.wait_max),
            retry=retry_if_exception(again),
            before_sleep=_log_retry,
            reraise=True,
        )
        response: requests.Response = retrying(self.inner.send, request, **kwargs)
        return response

    def close(self) -> None:
        self.inner.close()


def install(session: requests.Session) -> requests.Session:
    """Wrap each of the session's adapters in a :class:`RetryingAdapter` (once)."""
    for prefix, adapter in list(session.adapters.items()):
        if not isinstance(adapter, RetryingAdapter):
            session.mount(prefix, RetryingAdapter(adapter))
    return session
