"""qemu-img, with secrets passed through a pipe, never on the command line or on disk."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenacity import (
    RetryError,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from provisioner.errors import ImageError

SECRET_ID = "sec0"  # noqa: S105 - the name of a qemu secret object, not a secret


class _Transient(Exception):
    pass


def _run(args: Sequence[str], secret: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run qemu-img; a secret goes in through a pipe as ``--object secret,file=/dev/fd/N``."""
    if secret is None:
        return subprocess.run(["qemu-img", *args], capture_output=True, check=False)
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                "qemu-img",
                args[0],
                "--object",
                f"secret,id={SECRET_ID},file=/dev/fd/{read_fd}",
                *args[1:],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(read_fd,),
        )
    finally:
        os.close(read_fd)
    try:
        os.write(write_fd, secret)
    finally:
        os.close(write_fd)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` as a dict; the format is probed, which is fine for reading metadata."""
    r = _run(["info", "--output=json", str(path)])
    if r.returncode != 0:
        raise ImageError(f"{path}: not readable by qemu-img: {_err(r)}")
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def _err(r: subprocess.CompletedProcess[bytes]) -> str:
    text = r.stderr.decode(errors="replace").strip().splitlines()
    return text[-1] if text else f"exit {r.returncode}"


def encrypt(src: Path, src_format: str, dst: Path, passphrase: bytes, iter_time_ms: int) -> None:
    """Convert src into a qcow2 with LUKS inside, keyed by passphrase.

    qemu-img times PBKDF2 to choose the LUKS iteration count, with the thread's CPU time,
    which the kernel may account in whole scheduler ticks: on a loaded machine a timing
    run can see no CPU time at all, and qemu-img gives up ("Unable to get accurate CPU
    usage"). That is tried again, with random back-off, for up to two minutes.
    """
    try:
        _encrypt(src, src_format, dst, passphrase, iter_time_ms)
    except RetryError as e:
        raise ImageError(
            f"qemu-img could not time the LUKS key derivation: {e.last_attempt.exception()}",
            hint="the machine was too busy for qemu-img's CPU-time measurement for two "
            "minutes; run the command again when it is less loaded",
        ) from None


@retry(
    retry=retry_if_exception_type(_Transient),
    stop=stop_after_delay(120) | stop_after_attempt(30),
    wait=wait_random_exponential(multiplier=0.5, max=10),
)
def _encrypt(src: Path, src_format: str, dst: Path, passphrase: bytes, iter_time_ms: int) -> None:
    r = _run(
        [
            "convert",
            "-f",
            src_format,
            "-O",
            "qcow2",
            "-o",
            f"encrypt.format=luks,encrypt.key-secret={SECRET_ID},encrypt.iter-time={iter_time_ms}",
            str(src),
            str(dst),
        ],
        secret=passphrase,
    )
    if r.returncode != 0:
        message = _err(r)
        if "accurate CPU usage" in message:  # see encrypt()
            raise _Transient(message)
        raise ImageError(f"encryption with qemu-img failed: {message}")


def decrypt(src: Path, dst: Path, passphrase: bytes) -> None:
    """Decrypt a qcow2+LUKS image into a raw file (tests and operators' checks)."""
    r = _run(
        [
            "convert",
            "--image-opts",
            f"driver=qcow2,file.filename={src},encrypt.key-secret={SECRET_ID}",
            "-O",
            "raw",
            str(dst),
        ],
        secret=passphrase,
    )
    if r.returncode != 0:
        raise ImageError(f"decryption failed: {_err(r)}")


def check_luks_qcow2(path: Path) -> dict[str, Any]:
    """Refuse a file that is not a qcow2 with LUKS encryption inside; return its info."""
    r = _run(["info", "-f", "qcow2", "--output=json", str(path)])
    if r.returncode != 0:
        raise ImageError(f"not a qcow2 image: {_err(r)}")
    data: dict[str, Any] = json.loads(r.stdout)
    if data.get("format") != "qcow2" or not data.get("encrypted"):
        raise ImageError("image is not LUKS-encrypted")
    fmt = (data.get("format-specific", {}).get("data", {}).get("encrypt") or {}).get("format")
    if fmt != "luks":
        raise ImageError(f"image encryption is {fmt!r}, not luks")
    if data.get("backing-filename") or data.get("format-specific", {}).get("data", {}).get(
        "data-file"
    ):
        raise ImageError("image refers to another file (backing or data file)")
    return data


def check_passphrase(path: Path, passphrase: bytes) -> None:
    """Refuse a passphrase that does not open the LUKS image inside the qcow2 at ``path``.

    ``qemu-img snapshot -l`` opens the image with its key (``info`` does not ask for it),
    which costs one LUKS key derivation and reads no data.
    """
    r = _run(
        [
            "snapshot",
            "-l",
            "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret={SECRET_ID}",
        ],
        secret=passphrase,
    )
    if r.returncode != 0:
        raise ImageError(f"the key does not open the image: {_err(r)}")
