"""Host releases in the test bed's Glance: `edgepin host publish` and `edgepin host list`.

The host update is made from a small disk laid out as a built one (tests/hostupdates.py);
the image tier checks the real one against its disk (tests/image/test_verity.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cursive import signature_utils

from provisioner.errors import ImageError
from provisioner.operator import assign
from provisioner.signing import load_certificate
from tests import hostupdates
from tests.testbed.node import run_edgepin
from tests.testbed.operator import Signer

pytestmark = pytest.mark.integration


def host_releases(cli_env: dict[str, str]) -> list[dict[str, Any]]:
    r = run_edgepin(["host", "list", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    found: list[dict[str, Any]] = json.loads(r.stdout)
    return found


def one_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("edgepin: error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def test_a_host_release_is_signed_in_glance_as_its_own_kind_and_never_a_guest(
    cli_env: dict[str, str], admin: Any, signer: Signer, tmp_path: Path
) -> None:
    before_list = host_releases(cli_env)
    before = {r["image_id"] for r in before_list}
    newest = max([1_700_000_000, *(r["host_version"] for r in before_list)])
    version = newest + 1 + secrets.randbelow(10**6)
    update, made, _ = hostupdates.write(tmp_path, host_version=version)

    r = run_edgepin(["host", "publish", str(update), "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    rel = json.loads(r.stdout)
    assert rel["host_version"] == version and rel["root_hash"] == made.verity.root_hash
    image = admin.image.get(f"/images/{rel['image_id']}").json()
    data = update.read_bytes()
    for key, value in {
        "edgepin_kind": "host-update",
        "edgepin_host_version": str(version),
        "edgepin_host_root_hash": made.verity.root_hash,
        "disk_format": "raw",
        "status": "active",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(data).hexdigest(),
        "img_signature_certificate_uuid": signer.cert_id,
        "img_signature_hash_method": "SHA-512",
        "name": f"edgepin-host-{version}",
    }.items():
        assert image.get(key) == value, key
    assert not any(k.startswith("os_encrypt") for k in image), "a host root holds no secret"
    # the bytes in Glance are the file's, signed with the image-signing key (cursive)
    assert admin.image.get(f"/images/{rel['image_id']}/file").content == data
    verifier = signature_utils.create_verifier_for_pss(
        base64.b64decode(image["img_signature"]),
        hashes.SHA512(),
        load_certificate(signer.pem).public_key(),
    )
    verifier.update(data)
    verifier.verify()

    listed = host_releases(cli_env)
    assert [x["image_id"] for x in listed if x["image_id"] not in before] == [rel["image_id"]]

    # never a guest: the check `edgepin assign` makes of an image, on Glance's own record
    with pytest.raises(ImageError, match="is a host release, not a guest image"):
        assign.check_image(image)

    # the same version again, or an older one: refused, nothing created
    for older in (version, version - 1):
        (tmp_path / str(older)).mkdir()
        again, _, _ = hostupdates.write(tmp_path / str(older), host_version=older)
        err = one_error(run_edgepin(["host", "publish", str(again)], cli_env))
        assert f"host version {older} is not greater than the newest host release" in err, err
    assert len(host_releases(cli_env)) == len(listed)


def test_what_is_not_a_whole_host_update_is_refused_before_anything_is_created(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    version = 2_000_000_000 + secrets.randbelow(10**8)
    update, _, _ = hostupdates.write(tmp_path, host_version=version)
    before = host_releases(cli_env)
    data = update.read_bytes()
    with tarfile.open(update) as tar:
        at = tar.getmembers()[-1].offset_data + 100  # a byte of the root squashfs
    cases = {
        "changed": (lambda b: b[:at] + bytes([b[at] ^ 1]) + b[at + 1 :], "sha256"),
        "cut": (lambda b: b[: len(b) // 2], "truncated"),
        "a guest image": (lambda b: b"QFI\xfb" + bytes(65532), "not a host update"),
    }
    for name, (change, why) in cases.items():
        bad = tmp_path / f"{name}.tar"
        bad.write_bytes(change(data))
        err = one_error(run_edgepin(["host", "publish", str(bad)], cli_env))
        assert why in err, (name, err)
    assert host_releases(cli_env) == before
