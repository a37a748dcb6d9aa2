"""provisioner.node.token: the kept token is read as untrusted input, used only for the
credential it was issued to, and written only where memory holds it (pure logic, with
keystoneauth's real identity plugin, which needs no network to take a state)."""

from __future__ import annotations

import datetime
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keystoneauth1.identity import v3

from provisioner.errors import StateError
from provisioner.node import token

pytestmark = pytest.mark.unit

URL = "https://keystone.example/v3"
TOKEN_ID = "gAAAAAB-token"


def plugin() -> v3.ApplicationCredential:
    return v3.ApplicationCredential(
        auth_url=URL, application_credential_id="c1", application_credential_secret="s"
    )


def auth_state(token_id: str = TOKEN_ID, hours: float = 1.0) -> str:
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=hours)
    body = {"token": {"expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "methods": []}}
    return json.dumps({"auth_token": token_id, "body": body})


def kept(credential_id: str = "c1", auth_url: str = URL, state: str | None = None) -> bytes:
    doc = {"credential_id": credential_id, "auth_url": auth_url, "auth_state": state}
    doc["auth_state"] = state if state is not None else auth_state()
    return json.dumps(doc).encode()


@pytest.fixture
def memory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


@settings(max_examples=300)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_state_or_a_state_error(raw: bytes) -> None:
    try:
        assert isinstance(token.parse(raw, "c1", URL), str)
    except StateError:
        pass


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=20,
    )
)
def test_any_json_inside_the_record_is_a_state_or_a_state_error(inner: object) -> None:
    for raw in (kept(state=json.dumps(inner)), json.dumps(inner).encode()):
        try:
            token.parse(raw, "c1", URL)
        except StateError:
            pass


def test_a_token_is_used_only_for_its_credential_and_keystone() -> None:
    assert json.loads(token.parse(kept(), "c1", URL))["auth_token"] == "gAAAAAB-token"
    with pytest.raises(StateError, match="another credential"):
        token.parse(kept(credential_id="c2"), "c1", URL)
    with pytest.raises(StateError, match="another credential"):
        token.parse(kept(auth_url="https://elsewhere/v3"), "c1", URL)
    with pytest.raises(StateError, match="malformed"):
        token.parse(kept(state=auth_state("tok\nen")), "c1", URL)


def test_restore_gives_keystoneauth_the_token_and_keep_writes_it_back(memory: Path) -> None:
    (memory / "token.json").write_bytes(kept())
    auth = plugin()
    assert token.restore(memory, auth, "c1", URL)
    assert auth.auth_ref is not None and auth.auth_ref.auth_token == "gAAAAAB-token"
    (memory / "token.json").unlink()
    token.keep(memory, auth, "c1", URL)
    saved = memory / "token.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(token.parse(saved.read_bytes(), "c1", URL))["auth_token"] == "gAAAAAB-token"


def test_a_bad_or_foreign_kept_token_is_forgotten_and_not_used(memory: Path) -> None:
    for raw in (b"{not json", kept(credential_id="c2"), kept(state='{"auth_token": 1}')):
        (memory / "token.json").write_bytes(raw)
        auth = plugin()
        assert not token.restore(memory, auth, "c1", URL)
        assert auth.auth_ref is None
        assert not (memory / "token.json").exists()


def test_an_invalidated_token_is_forgotten(memory: Path) -> None:
    (memory / "token.json").write_bytes(kept())
    auth = plugin()
    assert token.restore(memory, auth, "c1", URL)
    auth.invalidate()  # what keystoneauth does when a request with it gets a 401
    token.keep(memory, auth, "c1", URL)
    assert not (memory / "token.json").exists()


def test_the_token_is_never_written_outside_memory() -> None:
    # a folder next to this file: on the disk the checkout is on
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as d:
        disk = Path(d)
        assert not token.in_memory(disk)
        auth = plugin()
        auth.set_auth_state(auth_state())
        token.keep(disk, auth, "c1", URL)
        assert list(disk.iterdir()) == []


MOUNTS = """\
/dev/vda1 / ext4 rw 0 0
tmpfs /run tmpfs rw,nosuid 0 0
/dev/vda5 /run/media ext4 rw 0 0
tmpfs /srv/my\\040disk tmpfs rw 0 0
"""


@pytest.mark.parametrize(
    ("p", "kind"),
    [
        ("/run/edgepin", "tmpfs"),
        ("/run", "tmpfs"),
        ("/running", "ext4"),
        ("/run/media/stick/run", "ext4"),
        ("/srv/my disk/x", "tmpfs"),
        ("/var/lib/edgepin", "ext4"),
    ],
)
def test_the_filesystem_of_a_path_is_its_longest_mount_point(p: str, kind: str) -> None:
    assert token.filesystem_of(Path(p), MOUNTS) == kind
