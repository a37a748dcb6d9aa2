"""The NoCloud seed that carries a node's enrollment bundle to its first boot.

The seed is a small vfat filesystem labelled ``CIDATA`` (the only kind cloud-init's
NoCloud datasource finds on a disk). The bundle is in its ``meta-data``, under
``edgepin_bundle`` (base64 of the bundle's JSON): cloud-init reads meta-data as data and
keeps it in its instance data (``/run/cloud-init/instance-data-sensitive.json``, root
only), from where ``edgepin node seed`` takes it to ``/var/lib/edgepin/seed/bundle.json``
(mode 0600) for ``edgepin node enroll``. The host image discards user-data and vendor-data
altogether (``allow_userdata: false``), so nothing in a seed is ever run: the seed's
``user-data`` is an empty cloud-config only because NoCloud wants the file. The seed also
holds ``edgepin-bundle.json``, the bundle as a file, for people and factory checks. It is
built with mkfs.vfat and mtools, without mounting anything. The bundle holds no secret in
the clear: its credential's secret is wrapped for the node's TPM. The credential is either
a bootstrap credential the node uses once to create its own (``bootstrap``), or, for a
node enrolled with ``edgepin enroll --offline``, the node's own restricted credential
(``node_credential``), which the node seals without asking Keystone anything.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from provisioner.errors import ConfigError, UsageError

BUNDLE_PATH = "/var/lib/edgepin/seed/bundle.json"
BUNDLE_VERSION = 1
SEED_SIZE_KIB = 1024


META_KEY = "edgepin_bundle"
INSTANCE_DATA = "/run/cloud-init/instance-data-sensitive.json"
USER_DATA = (
    "#cloud-config\n# edgepin: the enrollment bundle is in meta-data; user-data is not read\n"
)


class Credential(enum.StrEnum):
    """The kind of credential a seed bundle wraps, named by its key in the bundle."""

    BOOTSTRAP = "bootstrap"  # used once by the node to create its own credential
    NODE = "node_credential"  # the node's own credential, made at the factory (offline)


def credential(bundle: dict[str, Any]) -> tuple[Credential, dict[str, Any]]:
    """Which credential a parsed bundle wraps, and its record (id, wrapped secret)."""
    for kind in Credential:
        if kind.value in bundle:
            record: dict[str, Any] = bundle[kind.value]
            return kind, record
    raise ConfigError("seed bundle holds no credential")


def encode_bundle(bundle: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(bundle, sort_keys=True).encode()).decode()


def meta_data(node_id: str, credential_id: str, bundle: dict[str, Any]) -> str:
    """Each seed is its own cloud-init instance: a node given a new seed (its credential
    rotated before it enrolled) takes the new bundle at its next boot."""
    return (
        f"instance-id: edgepin-{node_id}-{credential_id[:12]}\n"
        f"local-hostname: {node_id}\n"
        f"{META_KEY}: {encode_bundle(bundle)}\n"
    )


def write_seed(path: Path, node_id: str, bundle: dict[str, Any]) -> None:
    """Write the node's seed image atomically (a failure leaves no partial file)."""
    write_nocloud(
        path,
        {
            "meta-data": meta_data(
                node_id, str(credential(bundle)[1]["application_credential_id"]), bundle
            ),
            "user-data": USER_DATA,
            "edgepin-bundle.json": json.dumps(bundle, indent=2, sort_keys=True) + "\n",
        },
    )


def write_nocloud(path: Path, files: dict[str, str]) -> None:
    """A NoCloud seed: a vfat image labelled CIDATA holding ``files``, written atomically."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepin-seed-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        image = path.with_name(f".{path.name}.tmp{os.getpid()}")
        image.unlink(missing_ok=True)
        try:
            _run(["mkfs.vfat", "-C", "-n", "CIDATA", "--invariant", str(image), str(SEED_SIZE_KIB)])
            for name in files:
                _run(["mcopy", "-o", "-i", str(image), str(Path(tmp) / name), f"::{name}"])
            with image.open("rb") as f:
                os.fsync(f.fileno())
            image.replace(path)
        finally:
            image.unlink(missing_ok=True)


def read_seed_bundle(image: Path) -> dict[str, Any]:
    """The bundle from a seed image (factory checks and tests; nodes get it through
    cloud-init's instance data)."""
    r = subprocess.run(
        ["mcopy", "-i", str(image), "::edgepin-bundle.json", "-"],
        capture_output=True,
        check=False,
    )
    if r.returncode != 0:
        raise ConfigError(f"{image}: not an edgepin seed ({r.stderr.decode().strip()})")
    return parse_bundle(r.stdout)


def bundle_from_instance_data(data: bytes) -> dict[str, Any] | None:
    """The bundle in cloud-init's instance data (untrusted: it is what a seed said), or
    None when the seed held none (another datasource, or a seed that is not edgepin's)."""
    try:
        instance = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError("cloud-init's instance data is not JSON") from None
    ds = instance.get("ds") if isinstance(instance, dict) else None
    meta = ds.get("meta_data") if isinstance(ds, dict) else None
    if not isinstance(meta, dict) or META_KEY not in meta:
        return None
    encoded = meta[META_KEY]
    if not isinstance(encoded, str) or len(encoded) > 1 << 20:
        raise ConfigError(f"seed meta-data: {META_KEY} is not a base64 string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ConfigError(f"seed meta-data: {META_KEY} is not base64") from None
    return parse_bundle(raw)


def parse_bundle(data: bytes) -> dict[str, Any]:
    """The enrollment bundle from untrusted bytes (a seed medium): a checked dict, or
    ConfigError; never anything else."""
    try:
        bundle = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError("seed bundle is not JSON") from None
    if not isinstance(bundle, dict):
        raise ConfigError("seed bundle is not a JSON object")
    if bundle.get("version") != BUNDLE_VERSION:
        raise ConfigError(f"seed bundle version {bundle.get('version')!r} is not supported")
    missing = [
        k for k in ("node_id", "project_id", "user_id", "auth_url", "pcrs") if k not in bundle
    ]
    if missing:
        raise ConfigError(f"seed bundle lacks {', '.join(missing)}")
    for key in ("node_id", "project_id", "user_id", "auth_url"):
        _text(bundle[key], key)
    if not bundle["auth_url"].startswith("https://"):
        raise ConfigError("seed bundle: the Keystone URL must be https://")
    for key in ("region", "ca_pem"):
        if bundle.get(key) is not None:
            _text(bundle[key], key, size=1 << 16, printable=False)
    if bundle.get("interface", "public") not in ("public", "internal", "admin"):
        raise ConfigError("seed bundle: interface must be public, internal or admin")
    pcrs = bundle["pcrs"]
    if (
        not isinstance(pcrs, list)
        or not pcrs
        or not all(type(p) is int and 0 <= p <= 23 for p in pcrs)
    ):
        raise ConfigError("seed bundle: pcrs must be a non-empty list of PCR numbers 0..23")
    kinds = [kind for kind in Credential if kind.value in bundle]
    if len(kinds) != 1:
        raise ConfigError(
            f"seed bundle must hold exactly one of {', '.join(k.value for k in Credential)}"
        )
    name = kinds[0].value
    cred = bundle[name]
    if not isinstance(cred, dict):
        raise ConfigError(f"seed bundle: {name} is not an object")
    _text(cred.get("application_credential_id"), f"{name}.application_credential_id")
    wrapped = _text(cred.get("wrapped"), f"{name}.wrapped", size=1 << 16)
    try:
        base64.b64decode(wrapped, validate=True)
    except ValueError:
        raise ConfigError(f"seed bundle: {name}.wrapped is not base64") from None
    return bundle


def _text(value: Any, what: str, size: int = 1024, printable: bool = True) -> str:
    if not isinstance(value, str) or not value or len(value) > size:
        raise ConfigError(f"seed bundle: {what} is not a non-empty string")
    if printable and not value.isprintable():
        raise ConfigError(f"seed bundle: {what} is not printable text")
    return value


def _run(args: list[str]) -> None:
    r = subprocess.run(args, capture_output=True, check=False)
    if r.returncode != 0:
        raise ConfigError(f"{args[0]} failed: {r.stderr.decode(errors='replace').strip()}")
