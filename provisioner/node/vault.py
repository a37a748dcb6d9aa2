"""The state vault: what the node keeps on disk is encrypted with a key only its TPM
gives back, and only in the measured boot state.

The folders in ``VAULT_DIRS`` (the provisioner's state and images, the guest's serial
log, cloud-init's copy of the seed, the journal) are encrypted with fscrypt
(``provisioner.node.fscrypt``) under one 64-byte key. The key is made on the node at its
first boot and lives only in the TPM, in an NV index (``provisioner.tpm.VAULT_KEY``) that
is read and written only under the node's PCR policy: not on any disk, not sealed in a
file that could be swapped. ``edgepin node vault`` (``edgepin-vault.service``, early in
the boot, before anything reads or writes those folders) asks the TPM for the key and
gives it to the filesystem.

What it decides (``plan``), from the TPM's answer and what the folders are:

- no key in the TPM, no folder encrypted, the node not enrolled: its first boot. A key is
  made and every folder is encrypted (what the image put in them is copied in).
- the key: folders under it are kept; a missing or empty one is made encrypted; a plain
  one with content is encrypted while the node is not enrolled, refused once it is (its
  content was put there by someone without the key).
- anything else is refused, nothing is changed and no key is given to the filesystem: a
  folder encrypted under another key (the disk of another machine, or a TPM that was
  cleared), an enrolled node whose TPM holds no key, a TPM that refuses the key (another
  measured boot state) or whose NV index is not edgepin's.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import secrets
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner.errors import StateError
from provisioner.node import fscrypt, state

if TYPE_CHECKING:
    from provisioner import tpm

VAULT_DIRS = ("var/lib/edgepin", "var/log/edgepin", "var/lib/cloud", "var/log/journal")
_NEW, _OLD = ".vault-new", ".vault-old"


class VaultError(StateError):
    """The vault cannot be opened; nothing was changed."""


class Folder(enum.Enum):
    MISSING = "missing"
    EMPTY = "plain, empty"
    PLAIN = "plain, with content"
    OURS = "encrypted under the vault key"
    OTHER = "encrypted under another key"


class Action(enum.Enum):
    KEEP = "keep"
    ENCRYPT = "encrypt"


@dataclasses.dataclass(frozen=True)
class Plan:
    make_key: bool
    actions: Mapping[str, Action]


def plan(key_held: bool, enrolled: bool, folders: Mapping[str, Folder]) -> Plan:
    """What to do, or VaultError. ``folders`` say OURS only when the key is held (a
    folder's policy can be compared with the key only once the key is known)."""
    encrypted = sorted(name for name, f in folders.items() if f in (Folder.OURS, Folder.OTHER))
    if not key_held:
        if encrypted:
            raise VaultError(
                f"{', '.join(encrypted)} encrypted under a key this TPM does not hold: the "
                "disk was written on another machine, or the TPM was cleared; nothing is "
                "opened (to use the machine again, write its disk again)"
            )
        if enrolled:
            raise VaultError(
                "the node is enrolled but its TPM holds no vault key; nothing is opened "
                "(to use the machine again, write its disk again)"
            )
    actions: dict[str, Action] = {}
    for name, folder in sorted(folders.items()):
        if folder is Folder.OTHER:
            raise VaultError(f"{name} is encrypted under another key than the node's vault key")
        if folder is Folder.PLAIN and enrolled:
            raise VaultError(
                f"{name} is not encrypted and holds files on an enrolled node: the disk "
                "was changed offline; nothing is opened"
            )
        actions[name] = Action.KEEP if folder is Folder.OURS else Action.ENCRYPT
    return Plan(make_key=not key_held, actions=actions)


@dataclasses.dataclass(frozen=True)
class Opened:
    identifier: bytes
    made_key: bool
    encrypted_now: tuple[str, ...]


def _finish_interrupted(path: Path) -> None:
    """Complete or undo an encryption that a power cut interrupted."""
    new, old = path.with_name(path.name + _NEW), path.with_name(path.name + _OLD)
    if not path.exists() and new.is_dir() and old.is_dir():
        new.rename(path)  # cut between the two renames
    if old.exists():
        shutil.rmtree(old)
    if new.exists():
        shutil.rmtree(new)  # cut before the swap: done again from the plain folder


def _inspect(path: Path, identifier: bytes | None) -> Folder:
    if not path.exists():
        return Folder.MISSING
    if path.is_symlink() or not path.is_dir():
        raise VaultError(f"{path} is not a folder")
    got = fscrypt.policy_identifier(path)
    if got is None:
        return Folder.PLAIN if any(path.iterdir()) else Folder.EMPTY
    return Folder.OURS if identifier is not None and got == identifier else Folder.OTHER


def _copy_into(src: Path, dst: Path) -> None:
    """Copy a folder's content with owners, modes and times (into an encrypted folder
    files must be copied: the kernel refuses to move a plain file into one)."""
    for entry in sorted(src.iterdir()):
        st = entry.lstat()
        target = dst / entry.name
        if stat.S_ISDIR(st.st_mode):
            target.mkdir()
            _copy_into(entry, target)
        elif stat.S_ISLNK(st.st_mode):
            target.symlink_to(os.readlink(entry))
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(entry, target, follow_symlinks=False)
        else:
            continue  # sockets, fifos, devices: made again by whoever uses them
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _encrypt(path: Path, identifier: bytes) -> None:
    new, old = path.with_name(path.name + _NEW), path.with_name(path.name + _OLD)
    st = path.stat() if path.exists() else None
    new.mkdir(mode=0o700)
    fscrypt.set_policy(new, identifier)
    if st is not None:
        _copy_into(path, new)
        os.chown(new, st.st_uid, st.st_gid)
        os.chmod(new, stat.S_IMODE(st.st_mode))
        state.fsync_dir(new)
        path.rename(old)
    new.rename(path)
    state.fsync_dir(path.parent)
    if st is not None:
        shutil.rmtree(old)


def open_vault(root: Path, tcti: str, pcrs: tpm.Policy) -> Opened:
    """Give the filesystem the vault key (made on the first boot) and make sure every
    vault folder is encrypted under it; VaultError when it must not."""
    from provisioner import tpm

    if not pcrs:
        raise VaultError("refusing to open the vault without a PCR policy (EDGEPIN_PCRS)")
    paths = {d: root / d for d in VAULT_DIRS}
    parents = {p.parent for p in paths.values()}
    for parent in parents:
        parent.mkdir(parents=True, exist_ok=True)
    if len({os.stat(p).st_dev for p in parents}) != 1:
        raise VaultError("the vault's folders are not on one filesystem")
    mountpoint = next(iter(sorted(parents)))
    try:
        with tpm.Tpm.open(tcti) as t:
            enrolled = t.anchor_defined()
            key = t.vault_key_read(pcrs)
            if key is None:
                # refused here, nothing on the disk has been touched
                plan(False, enrolled, {d: _inspect(p, None) for d, p in paths.items()})
                key = secrets.token_bytes(fscrypt.KEY_SIZE)
                t.vault_key_create(pcrs, key)
                made = True
            else:
                made = False
    except tpm.TpmError as e:
        raise VaultError(f"the TPM does not give the vault key: {e}") from None
    identifier = fscrypt.add_key(mountpoint, key)
    for path in paths.values():
        _finish_interrupted(path)
    decided = plan(True, enrolled, {d: _inspect(p, identifier) for d, p in paths.items()})
    done = []
    for name, action in decided.actions.items():
        if action is Action.ENCRYPT:
            _encrypt(paths[name], identifier)
            done.append(name)
    return Opened(identifier=identifier, made_key=made, encrypted_now=tuple(done))
