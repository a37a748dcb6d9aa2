"""The operator's fail-closed checks (pure logic): what assign grants, https-only URLs,
unexpected application credentials."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from provisioner import barbican
from provisioner.errors import ImageError, UsageError
from provisioner.operator import imagesecrets, status, urls
from provisioner.operator.imagesecrets import SecretBindingError
from provisioner.signing import fingerprint
from tests.certs import self_signed

pytestmark = pytest.mark.unit

IMAGE = str(uuid.uuid4())
KEY = str(uuid.uuid4())
CERT = str(uuid.uuid4())
PRIVATE = str(uuid.uuid4())


CERTIFICATE = self_signed(ec.generate_private_key(ec.SECP256R1()), "t")
PEM = CERTIFICATE.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[dict[str, Any], bytes]]:
    """Barbican's secrets as (metadata, payload), read through provisioner.barbican."""
    secrets: dict[str, tuple[dict[str, Any], bytes]] = {
        KEY: (
            {"name": imagesecrets.passphrase_name(IMAGE, CERT), "secret_type": "passphrase"},
            b"pass",
        ),
        CERT: ({"name": "edgepin-signing-cert:t", "secret_type": "certificate"}, PEM),
        PRIVATE: ({"name": "edgepin-signing-key:t", "secret_type": "private"}, b"KEY"),
    }
    monkeypatch.setattr(barbican, "secret_meta", lambda conn, sid: secrets[sid][0])
    monkeypatch.setattr(barbican, "payload", lambda conn, sid, text=False: secrets[sid][1])
    return secrets


def image(**props: Any) -> dict[str, Any]:
    return {
        "id": IMAGE,
        "os_encrypt_key_id": KEY,
        "img_signature_certificate_uuid": CERT,
        "edgepin_signing_cert_sha256": fingerprint(CERTIFICATE),
        **props,
    }


def test_what_publish_recorded_is_granted(vault: Any) -> None:
    assert imagesecrets.image_secrets(None, image()).ids == [KEY, CERT]


@pytest.mark.parametrize(
    ("props", "named", "says"),
    [
        ({"os_encrypt_key_id": PRIVATE}, PRIVATE, "not a passphrase"),
        ({"img_signature_certificate_uuid": PRIVATE}, KEY, "another signing certificate"),
        ({"edgepin_signing_cert_sha256": "0" * 64}, CERT, "is not the image's"),
        ({"id": str(uuid.uuid4())}, KEY, "is not this image's passphrase"),
    ],
)
def test_anything_else_is_refused_by_name(
    vault: Any, props: dict[str, Any], named: str, says: str
) -> None:
    with pytest.raises(SecretBindingError) as e:
        imagesecrets.image_secrets(None, image(**props))
    assert named in e.value.message and says in e.value.message
    assert e.value.fields["secret_id"] == named


def test_a_private_key_behind_the_certificate_property_is_refused(vault: Any) -> None:
    # the passphrase names this certificate id, so the property must match it; and a
    # certificate id that is a private key is refused by its type
    vault[KEY] = (
        {"name": imagesecrets.passphrase_name(IMAGE, PRIVATE), "secret_type": "passphrase"},
        b"pass",
    )
    with pytest.raises(SecretBindingError, match="not a certificate") as e:
        imagesecrets.image_secrets(None, image(img_signature_certificate_uuid=PRIVATE))
    assert e.value.fields["secret_id"] == PRIVATE


def test_a_passphrase_of_an_older_publish_says_republish(vault: Any) -> None:
    vault[KEY] = ({"name": "edgepin:web:1", "secret_type": "passphrase"}, b"pass")
    with pytest.raises(SecretBindingError) as e:
        imagesecrets.image_secrets(None, image())
    assert "edgepin:web:1" in e.value.message
    assert "edgepin publish" in (e.value.hint or "")


@pytest.mark.parametrize("value", [None, "", "not-a-uuid", 7, KEY.upper() + "x"])
def test_a_property_that_is_not_a_secret_id(vault: Any, value: Any) -> None:
    with pytest.raises(ImageError, match="not a Barbican secret id"):
        imagesecrets.image_secrets(None, image(os_encrypt_key_id=value))


# ---------------------------------------------------------------- https only


@pytest.mark.parametrize(
    "url",
    ["http://k:5000/v3", "HTTP://k/v3", "https://", "ftp://k", "k:5000", "", None, " https:/k"],
)
def test_plain_or_malformed_urls_are_refused(url: Any) -> None:
    with pytest.raises(UsageError, match="https://"):
        urls.require_https(url, "the node's Keystone URL")


def test_https_urls_pass() -> None:
    assert urls.require_https("https://10.0.2.2:5000/v3", "x") == "https://10.0.2.2:5000/v3"
    assert urls.is_https("HTTPS://[::1]:9311")


@given(st.one_of(st.text(), st.binary(), st.none(), st.integers()))
def test_require_https_raises_only_its_own_error(value: Any) -> None:
    try:
        urls.require_https(value, "x")
    except UsageError:
        pass


class _Catalog:
    def __init__(self, entries: dict[tuple[str, str], list[str]]) -> None:
        self.entries = entries

    def get_urls(self, service_type: str, interface: str, region_name: str | None) -> list[str]:
        return self.entries.get((service_type, interface), [])


class _Conn:
    def __init__(self, entries: dict[tuple[str, str], list[str]]) -> None:
        catalog = _Catalog(entries)
        access = type("Access", (), {"service_catalog": catalog})()
        auth = type("Auth", (), {"get_access": lambda self, session: access})()
        self.session = type("Session", (), {"auth": auth})()


def test_the_catalog_a_node_follows_must_be_https() -> None:
    good = {
        ("identity", "internal"): ["https://10.0.2.2:5000/v3"],
        ("image", "internal"): ["https://10.0.2.2:9292"],
        ("key-manager", "internal"): ["https://10.0.2.2:9311"],
    }
    assert urls.check_catalog(_Conn(good), "internal", "R", "node n1")["image"].startswith(
        "https://"
    )
    plain = {**good, ("key-manager", "internal"): ["https://a:9311", "http://b:9311"]}
    with pytest.raises(UsageError, match=r"key-manager endpoint .*'http://b:9311'"):
        urls.check_catalog(_Conn(plain), "internal", "R", "node n1")
    missing = {k: v for k, v in good.items() if k[0] != "image"}
    with pytest.raises(UsageError, match="no image endpoint"):
        urls.check_catalog(_Conn(missing), "internal", "R", "node n1")


# ---------------------------------------------------------------- credentials


def cred(name: str, cid: str = "") -> dict[str, Any]:
    return {"id": cid or name, "name": name}


@pytest.mark.parametrize(
    ("names", "unexpected"),
    [
        ([], []),
        (["edgepin-bootstrap-1a2b"], []),
        (["edgepin-node"], []),
        (["edgepin-node", "stray"], ["stray"]),
        (["edgepin-bootstrap-1a2b", "stray"], ["stray"]),
        (["edgepin-node", "edgepin-bootstrap-1a2b"], ["edgepin-bootstrap-1a2b"]),
        (["edgepin-node", "edgepin-node"], ["edgepin-node", "edgepin-node"]),
        (
            ["edgepin-bootstrap-1", "edgepin-bootstrap-2"],
            ["edgepin-bootstrap-1", "edgepin-bootstrap-2"],
        ),
    ],
)
def test_unexpected_credentials(names: list[str], unexpected: list[str]) -> None:
    creds = [cred(n, f"{n}-{i}") for i, n in enumerate(names)]
    assert [c["name"] for c in status.unexpected_credentials(creds)] == unexpected


@pytest.mark.parametrize("value", ["lan", "none", "host", "vlan:1", "vlan:4094"])
def test_publish_takes_each_form_of_network(value: str) -> None:
    from provisioner.cli import build_parser

    args = ["publish", "guest.qcow2", "--name", "g", "--version", "1", "--network", value]
    assert build_parser(args).parse_args(args).network == value


@pytest.mark.parametrize("value", ["vlan:0", "vlan:4095", "vlan:007", "wifi", "LAN", "vlan"])
def test_publish_refuses_a_bad_network_before_anything_is_uploaded(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.cli import build_parser

    args = ["publish", "guest.qcow2", "--name", "g", "--version", "1", "--network", value]
    with pytest.raises(SystemExit) as exited:
        build_parser(args).parse_args(args)
    assert exited.value.code == 2
    assert "lan, none, host or vlan:N (N from 1 to 4094)" in capsys.readouterr().err
