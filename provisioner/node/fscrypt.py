"""Linux's native file encryption (fscrypt, v2 policies) through its ioctls.

Debian has no small tool for it that reads a raw key (``fscrypt``, the Go program, keeps
its own metadata and protectors), so the four calls the vault needs are made here, with
the structures of ``linux/fscrypt.h``:

- ``add_key``: give the filesystem a 64-byte master key; the kernel answers with the
  key's identifier (a hash of it, safe to show and stored in every encrypted inode);
- ``set_policy``: make an empty directory encrypted under that key (AES-256-XTS for
  contents, AES-256-CTS for names), inherited by everything made in it;
- ``policy_identifier``: the identifier a directory is encrypted under, or None.

A master key stays in the filesystem's keyring until it is unmounted; every process
then reads the files in clear, as on any mounted filesystem. Without it, names are
encoded ciphertext and contents cannot be read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from provisioner.errors import StateError

KEY_SIZE = 64
_KEY_SPEC_TYPE_IDENTIFIER = 2
_IDENTIFIER_SIZE = 16
_POLICY_V2 = 2
_MODE_AES_256_XTS = 1
_MODE_AES_256_CTS = 4
_FLAGS_PAD_32 = 0x03


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("f") << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (ord("f") << 8) | nr


# struct fscrypt_add_key_arg without the raw key after it: the key specifier (type,
# reserved, a 32-byte union), raw_size, key_id, 32 reserved bytes
_ADD_KEY = struct.Struct("<II32sII32s")
# struct fscrypt_policy_v2
_POLICY = struct.Struct("<BBBBB3s16s")
FS_IOC_SET_ENCRYPTION_POLICY = _ior(19, 12)  # declared with the v1 structure's size
FS_IOC_GET_ENCRYPTION_POLICY_EX = _iowr(22, 9)
FS_IOC_ADD_ENCRYPTION_KEY = _iowr(23, _ADD_KEY.size)


class FscryptError(StateError):
    """The filesystem refused an encryption call."""


def _fd(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FscryptError(f"cannot open {path}: {e.strerror}") from None


def policy_bytes(identifier: bytes) -> bytes:
    """The v2 policy edgepin sets: AES-256-XTS contents, AES-256-CTS names, 32-byte name
    padding, under the key with this identifier."""
    if len(identifier) != _IDENTIFIER_SIZE:
        raise FscryptError(f"a key identifier has {_IDENTIFIER_SIZE} bytes")
    return _POLICY.pack(
        _POLICY_V2, _MODE_AES_256_XTS, _MODE_AES_256_CTS, _FLAGS_PAD_32, 0, b"", identifier
    )


def add_key(mountpoint: Path, key: bytes) -> bytes:
    """Add a master key to the filesystem at ``mountpoint`` (any directory on it);
    returns its identifier. Adding a key that is already there is not an error."""
    if len(key) != KEY_SIZE:
        raise FscryptError(f"a vault key has {KEY_SIZE} bytes")
    arg = bytearray(_ADD_KEY.pack(_KEY_SPEC_TYPE_IDENTIFIER, 0, b"", KEY_SIZE, 0, b"") + key)
    fd = _fd(mountpoint)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg, True)
    except OSError as e:
        hint = (
            ": the filesystem has no encryption (ext4 needs the 'encrypt' feature)"
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY)
            else ""
        )
        raise FscryptError(
            f"the filesystem of {mountpoint} refused the vault key: {e.strerror}{hint}"
        ) from None
    finally:
        os.close(fd)
        identifier = bytes(arg[8 : 8 + _IDENTIFIER_SIZE])
        arg[:] = bytes(len(arg))  # the key leaves no copy in this buffer
    return identifier


def set_policy(directory: Path, identifier: bytes) -> None:
    """Encrypt the empty ``directory`` under the key ``identifier`` (which must have been
    added); everything made in it inherits the policy."""
    fd = _fd(directory)
    try:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy_bytes(identifier))
    except OSError as e:
        raise FscryptError(f"cannot encrypt {directory}: {e.strerror}") from None
    finally:
        os.close(fd)


def parse_policy(buf: bytes) -> bytes | None:
    """The key identifier of a ``fscrypt_get_policy_ex_arg`` answer, if it is a v2 policy
    of the kind edgepin sets; None for any other policy (v1, other modes)."""
    if len(buf) < 8 + _POLICY.size:
        return None
    (size,) = struct.unpack_from("<Q", buf)
    if size != _POLICY.size:
        return None
    version, contents, names, flags, _log2, _res, identifier = _POLICY.unpack_from(buf, 8)
    if (version, contents, names, flags) != (
        _POLICY_V2,
        _MODE_AES_256_XTS,
        _MODE_AES_256_CTS,
        _FLAGS_PAD_32,
    ):
        return None
    return bytes(identifier)


class ForeignPolicy(FscryptError):
    """The directory is encrypted, but not the way edgepin encrypts."""


def policy_identifier(directory: Path) -> bytes | None:
    """The identifier of the key ``directory`` is encrypted under; None when it is not
    encrypted. A policy edgepin does not set raises ForeignPolicy."""
    buf = bytearray(struct.pack("<Q", _POLICY.size) + bytes(_POLICY.size))
    fd = _fd(directory)
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, buf, True)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        if e.errno == errno.EOVERFLOW:
            raise ForeignPolicy(
                f"{directory} is encrypted with a policy edgepin does not set"
            ) from None
        raise FscryptError(f"cannot read the encryption of {directory}: {e.strerror}") from None
    finally:
        os.close(fd)
    identifier = parse_policy(bytes(buf))
    if identifier is None:
        raise ForeignPolicy(f"{directory} is encrypted with a policy edgepin does not set")
    return identifier
