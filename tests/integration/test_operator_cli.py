"""The operator CLI against the real test bed: publish, enroll, assign, status, revoke."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cursive import signature_utils

from provisioner import assignment, seed, tpm
from provisioner.errors import VerificationError
from provisioner.signing import fingerprint, load_certificate
from tests.certs import self_signed
from tests.integration.conftest import make_signer
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import run_edgepin, seed_meta_data
from tests.testbed.operator import Signer
from tests.testbed.swtpm import Swtpm

pytestmark = pytest.mark.integration


def image(admin: Any, image_id: str) -> dict[str, Any]:
    data: dict[str, Any] = admin.image.get(f"/images/{image_id}").json()
    return data


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    # progress lines ("==> ...") may come first; the error is exactly one line
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("edgepin: ")]
    assert len(errors) == 1 and errors[0].startswith("edgepin: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


def test_publish_properties_bytes_and_signature(
    publish: Callable[..., dict[str, Any]], admin: Any, signer: Signer, run_dir: Path
) -> None:
    pub = publish(version="1.2.3", extra=["--vcpus", "1", "--memory", "192"])
    img = image(admin, pub["image_id"])
    for key, value in {
        "os_encrypt_format": "LUKSv1",
        "os_encrypt_key_id": pub["key_id"],
        "os_encrypt_key_deletion_policy": "on_image_deletion",
        "os_decrypt_container_format": "bare",
        "img_signature_hash_method": "SHA-512",
        "img_signature_key_type": "RSA-PSS",
        "img_signature_certificate_uuid": signer.cert_id,
        "edgepin_version": "1.2.3",
        "edgepin_vcpus": "1",
        "edgepin_memory_mb": "192",
        "disk_format": "qcow2",
        "os_hash_algo": "sha512",
        "os_hash_value": pub["sha512"],
    }.items():
        assert img.get(key) == value, key
    assert int(img["os_decrypt_size"]) > 0
    # the bytes in Glance, decrypted with the passphrase from Barbican, are the plaintext
    enc = run_dir / f"dl-{pub['image_id']}.qcow2"
    enc.write_bytes(admin.image.get(f"/images/{pub['image_id']}/file").content)
    passphrase = admin.key_manager.get(
        f"/secrets/{pub['key_id']}/payload", headers={"Accept": "text/plain"}
    ).content
    r = subprocess.run(
        [
            "qemu-img",
            "compare",
            "--object",
            "secret,id=s0,file=/dev/stdin",
            "--image-opts",
            f"driver=qcow2,file.filename={enc},encrypt.key-secret=s0",
            f"driver=qcow2,file.filename={pub['plaintext']}",
        ],
        input=passphrase,
        capture_output=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # verified the way cursive verifies it (its own verifier classes)
    cert = load_certificate(signer.pem)
    verifier = signature_utils.create_verifier_for_pss(
        base64.b64decode(img["img_signature"]), hashes.SHA512(), cert.public_key()
    )
    verifier.update(enc.read_bytes())
    verifier.verify()


def test_glance_checks_the_signature_itself(
    admin: Any, signer: Signer, tiny_guest: Callable[..., Path]
) -> None:
    """With the img_signature* properties set at creation, a bad signature fails upload."""
    bogus = base64.b64encode(b"\x01" * 384).decode()
    created = admin.image.post(
        "/images",
        json={
            "name": "bad-signature",
            "disk_format": "qcow2",
            "container_format": "bare",
            "img_signature": bogus,
            "img_signature_hash_method": "SHA-256",
            "img_signature_key_type": "RSA-PSS",
            "img_signature_certificate_uuid": signer.cert_id,
        },
    ).json()
    try:
        r = admin.image.put(
            f"/images/{created['id']}/file",
            data=tiny_guest("sigcheck").read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
            raise_exc=False,
        )
        assert r.status_code == 400
        assert "ignature" in r.text
    finally:
        admin.image.delete(f"/images/{created['id']}", raise_exc=False)


def enroll(cli_env: dict[str, str], node_id: str, node_tpm: Swtpm, out: Path, *extra: str) -> Any:
    cert = out.with_suffix(".ek.pem")
    cert.write_bytes(node_tpm.ek_cert_pem())
    ca = out.with_suffix(".ekca.pem")
    ca.write_bytes(node_tpm.ca_cert_pem())
    r = run_edgepin(
        [
            "enroll",
            node_id,
            "--ek-cert",
            str(cert),
            "--ek-ca",
            str(ca),
            "--seed-out",
            str(out),
            "--json",
            *(extra or ("--pcrs", "7", "--pcr-values", "zero")),
        ],
        cli_env,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_enroll_wraps_for_that_tpm_only(
    cli_env: dict[str, str],
    controlplane: ControlPlane,
    make_swtpm: Callable[[str], Swtpm],
    run_dir: Path,
    admin: Any,
) -> None:
    node_tpm, other_tpm = make_swtpm("enroll"), make_swtpm("thief")
    node_id = f"node-{secrets.token_hex(3)}"
    out = run_dir / f"{node_id}.seed.img"
    result = enroll(cli_env, node_id, node_tpm, out, "--pcrs", "7", "--pcr-values", "zero")
    bundle = seed.read_seed_bundle(out)
    # the bundle travels as data in meta-data; user-data holds nothing to run
    meta = seed_meta_data(out)
    assert (
        seed.bundle_from_instance_data(json.dumps({"ds": {"meta_data": meta}}).encode()) == bundle
    )
    r = subprocess.run(
        ["mcopy", "-i", str(out), "::user-data", "-"], capture_output=True, text=True, check=True
    )
    assert r.stdout == seed.USER_DATA
    label = subprocess.run(
        ["mlabel", "-s", "-i", str(out), "::"], capture_output=True, text=True, check=True
    )
    assert "CIDATA" in label.stdout
    assert bundle["node_id"] == node_id and bundle["pcrs"] == [7]
    wrapped = base64.b64decode(bundle["bootstrap"]["wrapped"])
    # the node's TPM unseals it and Keystone accepts it
    with tpm.Tpm.open(node_tpm.tcti) as t:
        secret = t.unseal(wrapped, [7], ("duplicate",)).decode()
    assert secret not in out.read_bytes().decode(errors="replace")
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.ApplicationCredential(
        auth_url=bundle["auth_url"],
        application_credential_id=result["bootstrap_credential_id"],
        application_credential_secret=secret,
    )
    assert session.Session(auth=auth, verify=str(controlplane.ca_path)).get_token()
    # another TPM cannot; a changed PCR cannot
    with tpm.Tpm.open(other_tpm.tcti) as t, pytest.raises(tpm.TpmBlobError):
        t.unseal(wrapped, [7], ("duplicate",))
    with tpm.Tpm.open(node_tpm.tcti) as t:
        t.extend_pcr(7, b"another bootloader")
        with pytest.raises(tpm.TpmPolicyError):
            t.unseal(wrapped, [7], ("duplicate",))
    # enrolling again rotates: the old bootstrap credential is gone
    again = enroll(cli_env, node_id, node_tpm, run_dir / f"{node_id}.seed2.img")
    assert again["rotated"] == [result["bootstrap_credential_id"]]
    creds = admin.identity.get(f"/users/{result['user_id']}/application_credentials").json()
    assert [c["id"] for c in creds["application_credentials"]] == [again["bootstrap_credential_id"]]


def test_enroll_refuses_an_ek_cert_from_another_ca(
    cli_env: dict[str, str], swtpm: Swtpm, run_dir: Path, controlplane: ControlPlane
) -> None:
    cert = run_dir / "ek-other.pem"
    cert.write_bytes(swtpm.ek_cert_pem())
    r = run_edgepin(
        [
            "enroll",
            "node-wrong-ca",
            "--ek-cert",
            str(cert),
            "--ek-ca",
            str(controlplane.ca_path),
            "--seed-out",
            str(run_dir / "never.img"),
            "--pcrs",
            "7",
            "--pcr-values",
            "zero",
        ],
        cli_env,
    )
    assert "EK certificate refused" in one_line_error(r)
    assert r.returncode == 9
    assert not (run_dir / "never.img").exists()


def test_assign_signs_with_a_key_file_kept_off_the_control_plane(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
) -> None:
    """`assign --assignment-key-file/--assignment-cert-file` signs with a key that Barbican
    never holds; the record verifies against that certificate for that node only."""
    node_id = f"node-{secrets.token_hex(3)}"
    enrolled = enroll(cli_env, node_id, swtpm, run_dir / f"{node_id}.img")
    image = publish(version="1")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = self_signed(key, "assignments")
    key_file, cert_file = run_dir / f"{node_id}.key.pem", run_dir / f"{node_id}.cert.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files = ["--assignment-key-file", str(key_file), "--assignment-cert-file", str(cert_file)]
    # a key that is not the certificate's, or one file of the two: refused, nothing written
    other = run_dir / f"{node_id}.other.pem"
    other.write_bytes(
        self_signed(ec.generate_private_key(ec.SECP384R1())).public_bytes(
            serialization.Encoding.PEM
        )
    )
    r = run_edgepin(["assign", node_id, image["image_id"], *files[:3], str(other)], cli_env)
    assert r.returncode == 2 and "is not the key of" in r.stderr, r.stderr
    r = run_edgepin(["assign", node_id, image["image_id"], *files[:2]], cli_env)
    assert r.returncode == 2 and "go together" in r.stderr, r.stderr
    project = admin.identity.get(f"/projects/{enrolled['project_id']}").json()["project"]
    assert not project.get("edgepin_assignment")

    r = run_edgepin(["assign", node_id, image["image_id"], *files], cli_env)
    assert r.returncode == 0, r.stderr
    project = admin.identity.get(f"/projects/{enrolled['project_id']}").json()["project"]
    record = project["edgepin_assignment"]
    pinned = {fingerprint(cert): cert}
    got = assignment.verify(record, pinned, enrolled["project_id"], node_id)
    assert got is not None
    assert (got.image_id, got.generation, got.image_sha512) == (
        image["image_id"],
        1,
        image["sha512"],
    )
    with pytest.raises(VerificationError, match="another node"):
        assignment.verify(record, pinned, "f" * 32, node_id)


def test_assign_signs_the_next_generation_of_the_signed_record_only(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
) -> None:
    """The generation `assign` signs comes from the record it signed before, never from the
    readable copy that whoever writes the project can set; a key that cannot sign changes
    nothing."""
    node_id = f"node-{secrets.token_hex(3)}"
    enrolled = enroll(cli_env, node_id, swtpm, run_dir / f"{node_id}.img")
    project_url = f"/projects/{enrolled['project_id']}"
    a, b = publish(version="a"), publish(version="b")

    def record() -> dict[str, Any]:
        raw = admin.identity.get(project_url).json()["project"]["edgepin_assignment"]
        return dict(json.loads(raw))

    def write(value: dict[str, Any]) -> None:
        body = {"project": {"edgepin_assignment": json.dumps(value)}}
        admin.identity.patch(project_url, json=body)

    def assign(image: dict[str, Any], *extra: str) -> Any:
        return run_edgepin(["assign", node_id, image["image_id"], "--json", *extra], cli_env)

    assert json.loads(assign(a).stdout)["generation"] == 1
    # the readable generation pushed far up: not what the next one is counted from
    write({**record(), "generation": 2**62})
    r = assign(b)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generation"] == 2 and out["previous"] == {
        "image_id": a["image_id"],
        "generation": 1,
    }

    # a record this key did not sign: refused until the operator gives the generation
    write({"image_id": a["image_id"], "generation": 5})
    r = assign(a)
    assert r.returncode == 2 and "not one this key signed" in r.stderr, r.stderr
    assert record() == {"image_id": a["image_id"], "generation": 5}
    r = assign(a, "--generation", "7")
    assert r.returncode == 0 and json.loads(r.stdout)["generation"] == 7, r.stderr
    r = assign(b, "--generation", "7")
    assert r.returncode == 2 and "not higher than 7" in r.stderr, r.stderr

    # a key edgepin cannot sign with (P-256): refused before anything is shared or written
    key = ec.generate_private_key(ec.SECP256R1())
    key_file, cert_file = run_dir / f"{node_id}.p256.pem", run_dir / f"{node_id}.p256.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(self_signed(key).public_bytes(serialization.Encoding.PEM))
    before = record()
    files = ["--assignment-key-file", str(key_file), "--assignment-cert-file", str(cert_file)]
    r = assign(b, *files, "--generation", "9")
    assert r.returncode == 8, r.stderr
    assert record() == before
    members = admin.image.get(f"/images/{b['image_id']}/members").json()["members"]
    assert enrolled["project_id"] not in {m["member_id"] for m in members}


def test_assign_status_revoke(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node_id = f"node-{secrets.token_hex(3)}"
    enrolled = enroll(cli_env, node_id, swtpm, run_dir / f"{node_id}.img")
    first, second = publish(version="1"), publish(version="2")
    r = run_edgepin(["assign", node_id, first["image_id"], "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation"] == 1
    r = run_edgepin(["assign", node_id, second["image_id"], "--json"], cli_env)
    out = json.loads(r.stdout)
    assert out["generation"] == 2
    assert out["previous"]["image_id"] == first["image_id"]
    # only the current image's key is readable by the node's user
    acl = admin.key_manager.get(f"/secrets/{second['key_id']}/acl").json()
    assert enrolled["user_id"] in acl["read"]["users"]
    old_acl = admin.key_manager.get(f"/secrets/{first['key_id']}/acl").json()
    assert enrolled["user_id"] not in old_acl.get("read", {}).get("users", [])
    r = run_edgepin(["status", node_id, "--json"], cli_env)
    rows = json.loads(r.stdout)
    assert rows[0]["image_id"] == second["image_id"]
    assert rows[0]["generation"] == 2
    assert rows[0]["member_status"] == "pending"
    assert rows[0]["enrolled"] is False
    assert rows[0]["credential"].startswith("bootstrap until")
    table = run_edgepin(["status"], cli_env)
    assert table.returncode == 0 and node_id in table.stdout
    r = run_edgepin(["revoke", node_id, "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(run_edgepin(["status", node_id, "--json"], cli_env).stdout)
    assert rows[0]["credential"] == "revoked"
    assert rows[0]["member_status"] == "not-shared"
    acl = admin.key_manager.get(f"/secrets/{second['key_id']}/acl").json()
    assert enrolled["user_id"] not in acl.get("read", {}).get("users", [])


def test_bad_input_one_line_errors(
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    base = ["--signing-cert-id", signer.cert_id, "--signing-key-id", signer.key_id]
    r = run_edgepin(
        ["publish", str(run_dir / "missing.qcow2"), "--name", "x", "--version", "1", *base], cli_env
    )
    assert "no such file" in one_line_error(r)
    text = run_dir / "not-a-disk.img"
    text.write_bytes(b"hello world\n" * 1000)
    r = run_edgepin(["publish", str(text), "--name", "x", "--version", "1", *base], cli_env)
    assert "not a disk image" in one_line_error(r)
    r = run_edgepin(["assign", "no-such-node", "0" * 8], cli_env)
    assert "unknown node" in one_line_error(r)
    bad = run_dir / "bad-clouds.yaml"
    bad.write_text(
        controlplane.clouds_yaml.read_text().replace(
            controlplane.secrets()["admin_password"], "wrong-password"
        )
    )
    r = run_edgepin(["status"], {**cli_env, "OS_CLIENT_CONFIG_FILE": str(bad)})
    assert "refused" in one_line_error(r) and r.returncode == 4


def test_failed_publish_leaves_nothing(
    cli_env: dict[str, str],
    signer: Signer,
    controlplane: ControlPlane,
    admin: Any,
    tiny_guest: Callable[..., Path],
) -> None:
    guest = tiny_guest("glance-down")
    name = f"down-{secrets.token_hex(3)}"
    secrets_before = {s.secret_ref for s in admin.key_manager.secrets()}
    controlplane.stop_service("glance")
    try:
        r = run_edgepin(
            [
                "publish",
                str(guest),
                "--name",
                name,
                "--version",
                "1",
                "--signing-cert-id",
                signer.cert_id,
                "--signing-key-id",
                signer.key_id,
                "--luks-iter-time",
                "100",
            ],
            cli_env,
        )
    finally:
        controlplane.start_service("glance")
    assert "glance" in one_line_error(r) and r.returncode == 5
    assert {s.secret_ref for s in admin.key_manager.secrets()} == secrets_before
    assert not [i for i in admin.image.images() if i.name == name]
    # and Barbican down: the error names it
    controlplane.stop_service("barbican")
    try:
        r = run_edgepin(
            [
                "publish",
                str(guest),
                "--name",
                name,
                "--version",
                "1",
                "--signing-cert-id",
                signer.cert_id,
                "--signing-key-id",
                signer.key_id,
            ],
            cli_env,
        )
    finally:
        controlplane.start_service("barbican")
    assert "barbican" in one_line_error(r)


def edit_image(admin: Any, image_id: str, props: dict[str, str]) -> None:
    """What anyone who can edit an image can do: its properties are not signed."""
    r = admin.image.patch(
        f"/images/{image_id}",
        json=[{"op": "replace", "path": f"/{k}", "value": v} for k, v in props.items()],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        raise_exc=False,
    )
    assert r.status_code == 200, r.text


def acl_users(admin: Any, secret_id: str) -> list[str]:
    users: list[str] = (
        admin.key_manager.get(f"/secrets/{secret_id}/acl").json().get("read", {}).get("users", [])
    )
    return users


def test_assign_grants_only_what_publish_recorded(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    signer: Signer,
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
) -> None:
    node_id = f"node-{secrets.token_hex(3)}"
    enrolled = enroll(cli_env, node_id, swtpm, run_dir / f"{node_id}.img")
    user = enrolled["user_id"]
    # the passphrase's name binds it to its image and certificate; its type is passphrase
    good = publish(version="1")
    meta = admin.key_manager.get(f"/secrets/{good['key_id']}").json()
    assert meta["name"] == f"edgepin-image:{good['image_id']}:cert:{signer.cert_id}"
    assert meta["secret_type"] == "passphrase"

    # an edited image pointing at the private signing key: refused, the key's ACL untouched
    bad = publish(version="2")
    edit_image(admin, bad["image_id"], {"os_encrypt_key_id": signer.key_id})
    r = run_edgepin(["assign", node_id, bad["image_id"]], cli_env)
    line = one_line_error(r)
    assert signer.key_id in line and "not a passphrase" in line and r.returncode == 7
    assert user not in acl_users(admin, signer.key_id)
    # ... at the private key behind the certificate property: refused as well
    edit_image(
        admin,
        bad["image_id"],
        {"os_encrypt_key_id": bad["key_id"], "img_signature_certificate_uuid": signer.key_id},
    )
    r = run_edgepin(["assign", node_id, bad["image_id"]], cli_env)
    assert signer.key_id in one_line_error(r) and r.returncode == 7
    assert user not in acl_users(admin, signer.key_id)
    # ... at another image's passphrase: refused
    edit_image(
        admin,
        bad["image_id"],
        {"os_encrypt_key_id": good["key_id"], "img_signature_certificate_uuid": signer.cert_id},
    )
    r = run_edgepin(["assign", node_id, bad["image_id"]], cli_env)
    line = one_line_error(r)
    assert good["key_id"] in line and "not this image's passphrase" in line
    assert user not in acl_users(admin, good["key_id"])
    # ... at a certificate whose fingerprint is not the one the image pins: refused
    other = make_signer(cli_env, run_dir)
    edit_image(admin, good["image_id"], {"img_signature_certificate_uuid": other.cert_id})
    r = run_edgepin(["assign", node_id, good["image_id"]], cli_env)
    assert other.cert_id in one_line_error(r)
    assert user not in acl_users(admin, other.cert_id)
    edit_image(admin, good["image_id"], {"img_signature_certificate_uuid": signer.cert_id})

    # a passphrase stored by a publish that did not bind it: the error says what to do
    legacy = admin.key_manager.create_secret(
        name="edgepin:web:1",
        secret_type="passphrase",
        payload="legacy-passphrase",
        payload_content_type="text/plain",
    )
    legacy_id = legacy.secret_ref.rsplit("/", 1)[-1]
    edit_image(admin, bad["image_id"], {"os_encrypt_key_id": legacy_id})
    r = run_edgepin(["assign", node_id, bad["image_id"]], cli_env)
    assert legacy_id in one_line_error(r)
    assert "hint: publish the guest again with `edgepin publish`" in r.stderr

    # the image as published: granted, and nothing else
    r = run_edgepin(["assign", node_id, good["image_id"], "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation"] == 1  # the refusals changed nothing
    assert user in acl_users(admin, good["key_id"]) and user in acl_users(admin, signer.cert_id)
    for sid in (signer.key_id, bad["key_id"], legacy_id, other.cert_id):
        assert user not in acl_users(admin, sid)


def test_status_flags_unexpected_application_credentials(
    cli_env: dict[str, str],
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node_id = f"node-{secrets.token_hex(3)}"
    enrolled = enroll(cli_env, node_id, swtpm, run_dir / f"{node_id}.img")
    rows = json.loads(run_edgepin(["status", node_id, "--json"], cli_env).stdout)
    assert rows[0]["unexpected_credentials"] == [] and rows[0]["warnings"] == []
    # someone who held the node user's password (or its bootstrap credential) minted one
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    password = secrets.token_urlsafe(24)
    admin.identity.update_user(enrolled["user_id"], password=password)
    time.sleep(1.1)  # Keystone revokes tokens issued in the second of a password change
    user = session.Session(
        auth=v3.Password(
            auth_url=controlplane.auth_url,
            user_id=enrolled["user_id"],
            password=password,
            project_id=enrolled["project_id"],
        ),
        verify=str(controlplane.ca_path),
    )
    stray = user.post(
        f"{controlplane.auth_url}/users/{enrolled['user_id']}/application_credentials",
        json={"application_credential": {"name": "stray"}},
    ).json()["application_credential"]
    rows = json.loads(run_edgepin(["status", node_id, "--json"], cli_env).stdout)
    assert rows[0]["unexpected_credentials"] == [{"id": stray["id"], "name": "stray"}]
    assert rows[0]["warnings"] == [f"unexpected application credential stray ({stray['id']})"]
    table = run_edgepin(["status", node_id], cli_env)
    assert table.returncode == 0 and "UNEXPECTED: stray" in table.stdout


def test_only_https_urls(
    cli_env: dict[str, str],
    swtpm: Swtpm,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node_id = f"node-{secrets.token_hex(3)}"
    ek = run_dir / f"{node_id}.ek.pem"
    ek.write_bytes(swtpm.ek_cert_pem())
    base = ["enroll", node_id, "--ek-cert", str(ek), "--pcrs", "7", "--pcr-values", "zero"]
    out = run_dir / f"{node_id}.img"
    # the node's Keystone URL
    plain_keystone = controlplane.auth_url.replace("https://", "http://")
    r = run_edgepin([*base, "--seed-out", str(out), "--node-auth-url", plain_keystone], cli_env)
    assert plain_keystone in one_line_error(r) and r.returncode == 2
    # a catalog endpoint of the interface the node follows
    service = next(s for s in admin.identity.services() if s.type == "key-manager")
    endpoint = next(iter(admin.identity.endpoints(service_id=service.id, interface="admin")))
    plain = endpoint.url.replace("https://", "http://")
    admin.identity.update_endpoint(endpoint, url=plain)
    try:
        r = run_edgepin([*base, "--seed-out", str(out), "--node-interface", "admin"], cli_env)
    finally:
        admin.identity.update_endpoint(endpoint, url=endpoint.url)
    line = one_line_error(r)
    assert "key-manager endpoint" in line and plain in line and r.returncode == 2
    assert not out.exists()
    assert not admin.identity.find_project(node_id, ignore_missing=True)
    # the operator's own Keystone URL: refused before the password is sent to it
    plain_cloud = run_dir / "plain-clouds.yaml"
    plain_cloud.write_text(
        controlplane.clouds_yaml.read_text().replace(controlplane.auth_url, plain_keystone)
    )
    r = run_edgepin(["status"], {**cli_env, "OS_CLIENT_CONFIG_FILE": str(plain_cloud)})
    assert "auth_url" in one_line_error(r) and r.returncode == 2
