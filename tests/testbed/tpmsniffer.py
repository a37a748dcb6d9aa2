"""A recording forwarder between tpm2-tss's swtpm TCTI and a swtpm: what a logic analyser
on a discrete TPM's LPC/SPI bus reads.

The TCTI sends TPM commands to its port P and control requests to P + 1, so the sniffer
listens on two adjacent loopback ports and forwards each to the swtpm's. Every byte both
ways is kept in memory, per connection and direction, and written nowhere. ``find`` says
where some bytes occur without showing them; ``commands`` parses what was sent on the
command port (TPM2 command headers and authorization areas).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from typing import Literal

from tests.testbed.process import free_port

HOST = "127.0.0.1"
ST_SESSIONS = 0x8002
# TPMA_SESSION bits of an authorization in a command
DECRYPT = 0x20  # the command's first parameter is encrypted
ENCRYPT = 0x40  # the response's first parameter is to be encrypted
# command codes, and how many handles precede each one's authorization area
CC = {
    "Create": (0x153, 1),
    "Load": (0x157, 1),
    "Import": (0x156, 1),
    "Unseal": (0x15E, 1),
    "NV_Write": (0x137, 2),
    "NV_Read": (0x14E, 2),
    "NV_DefineSpace": (0x12A, 1),
    "NV_SetBits": (0x135, 2),
    "HierarchyChangeAuth": (0x129, 1),
}
NAMES = {code: (name, handles) for name, (code, handles) in CC.items()}


@dataclasses.dataclass
class Stream:
    """One TCP connection through the sniffer; the bytes stay out of every repr."""

    channel: Literal["command", "control"]
    number: int
    to_tpm: bytearray = dataclasses.field(default_factory=bytearray, repr=False)
    from_tpm: bytearray = dataclasses.field(default_factory=bytearray, repr=False)


@dataclasses.dataclass(frozen=True)
class Command:
    """A TPM2 command seen on the bus: its name (or code) and the attributes of each
    session in its authorization area."""

    name: str
    session_attributes: tuple[int, ...]

    def asks(self, bit: int) -> bool:
        return any(a & bit for a in self.session_attributes)


def parse_commands(data: bytes) -> list[Command]:
    """The TPM2 commands in a command port's byte stream, one after the other; the stream
    is cut short at anything that is not a command header."""
    out, at = [], 0
    while at + 10 <= len(data):
        tag, size, code = struct.unpack_from(">HII", data, at)
        if size < 10 or at + size > len(data):
            break
        body = data[at : at + size]
        name, handles = NAMES.get(code, (f"0x{code:x}", -1))
        attrs: tuple[int, ...] = ()
        if tag == ST_SESSIONS and handles >= 0:
            attrs = _session_attributes(body, 10 + 4 * handles)
        out.append(Command(name, attrs))
        at += size
    return out


def _session_attributes(body: bytes, at: int) -> tuple[int, ...]:
    (auth_size,) = struct.unpack_from(">I", body, at)
    at += 4
    end, attrs = at + auth_size, []
    while at < end:
        at += 4  # session handle
        (nonce,) = struct.unpack_from(">H", body, at)
        at += 2 + nonce
        attrs.append(body[at])
        at += 1
        (hmac,) = struct.unpack_from(">H", body, at)
        at += 2 + hmac
    return tuple(attrs)


class TpmSniffer:
    """Forward ``127.0.0.1:<port>`` and ``<port> + 1`` to a swtpm's command and control
    ports, recording everything."""

    def __init__(self, tpm_port: int, tpm_ctrl_port: int) -> None:
        self.targets = {"command": tpm_port, "control": tpm_ctrl_port}
        self.streams: list[Stream] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listeners = self._listen_pair()
        self.port = self._listeners["command"].getsockname()[1]

    @property
    def tcti(self) -> str:
        return f"swtpm:host={HOST},port={self.port}"

    def _listen_pair(self) -> dict[str, socket.socket]:
        for _attempt in range(50):
            port = free_port(HOST)
            pair: dict[str, socket.socket] = {}
            try:
                for channel, p in (("command", port), ("control", port + 1)):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    pair[channel] = s
                    s.bind((HOST, p))
                    s.listen(8)
                    s.settimeout(0.1)
                return pair
            except OSError:
                for s in pair.values():
                    s.close()
        raise RuntimeError("no two adjacent free ports on the loopback")

    def start(self) -> TpmSniffer:
        for channel, listener in self._listeners.items():
            self._spawn(self._accept, channel, listener)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sockets = [*self._listeners.values(), *self._sockets]
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self, channel: Literal["command", "control"], listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                tpm = socket.create_connection((HOST, self.targets[channel]))
            except OSError:  # the swtpm is gone: the TCTI sees a closed connection
                client.close()
                continue
            with self._lock:
                stream = Stream(channel, len(self.streams))
                self.streams.append(stream)
                self._sockets += [client, tpm]
            self._spawn(self._pump, client, tpm, stream.to_tpm)
            self._spawn(self._pump, tpm, client, stream.from_tpm)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    record += data  # recorded before it is passed on
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    # -- what was seen ------------------------------------------------------------
    def find(self, needle: bytes) -> list[str]:
        """Where ``needle`` occurs in the traffic, as "connection 2, to the TPM, byte
        118": a place, never the bytes around it."""
        where = []
        with self._lock:
            for s in self.streams:
                for direction, data in (("to the TPM", s.to_tpm), ("from the TPM", s.from_tpm)):
                    at = data.find(needle)
                    while at >= 0:
                        where.append(f"{s.channel} connection {s.number}, {direction}, byte {at}")
                        at = data.find(needle, at + 1)
        return where

    def commands(self) -> list[Command]:
        with self._lock:
            sent = [bytes(s.to_tpm) for s in self.streams if s.channel == "command"]
        return [c for data in sent for c in parse_commands(data)]

    def total(self) -> int:
        with self._lock:
            return sum(len(s.to_tpm) + len(s.from_tpm) for s in self.streams)
