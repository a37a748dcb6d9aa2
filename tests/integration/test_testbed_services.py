"""The test bed is real: Keystone, Glance and Barbican answer as in production."""

from __future__ import annotations

import collections
import hashlib
import os
import secrets
import sqlite3
import threading
from typing import Any

import pytest
import requests
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from tests.testbed.controlplane import ControlPlane
from tests.testbed.fixtures_controlplane import TestUser

pytestmark = pytest.mark.integration


def test_token_over_tls(controlplane: ControlPlane, admin: Any) -> None:
    assert controlplane.auth_url.startswith("https://")
    token = admin.auth_token
    assert token
    # the token validates against Keystone itself
    info = admin.identity.get("/auth/tokens", headers={"X-Subject-Token": token})
    assert info.status_code == 200
    assert info.json()["token"]["user"]["name"] == "admin"
    # and the service catalog has the proper service types
    types = {s.type for s in admin.identity.services()}
    assert {"identity", "image", "key-manager"} <= types


def test_tls_refused_without_the_run_ca(controlplane: ControlPlane) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(controlplane.auth_url, timeout=5, verify=True)


def test_glance_upload_download_sha512(admin: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    image = admin.image.create_image(
        name=f"bed-{secrets.token_hex(3)}",
        data=data,
        disk_format="raw",
        container_format="bare",
        allow_duplicates=True,
    )
    try:
        image = admin.image.get_image(image.id)
        assert image.status == "active"
        assert image.hash_algo == "sha512"
        assert image.hash_value == hashlib.sha512(data).hexdigest()
        body = admin.image.download_image(image, stream=False)
        assert hashlib.sha512(body.content).hexdigest() == image.hash_value
        # ranges are served by the file store
        r = admin.image.get(
            f"/images/{image.id}/file", headers={"Range": "bytes=100-199"}, stream=False
        )
        assert r.status_code == 206
        assert r.content == data[100:200]
    finally:
        admin.image.delete_image(image)


def test_barbican_acl_across_projects(controlplane: ControlPlane, make_user: Any) -> None:
    owner: TestUser = make_user("owner")
    reader: TestUser = make_user("reader")
    stranger: TestUser = make_user("stranger")
    payload = secrets.token_urlsafe(24)
    oc = owner.connection(controlplane)
    secret = oc.key_manager.create_secret(
        name="bed", payload=payload, payload_content_type="text/plain", secret_type="passphrase"
    )
    sid = secret.secret_id
    r = oc.key_manager.put(
        f"/secrets/{sid}/acl",
        json={"read": {"users": [reader.user_id], "project-access": False}},
    )
    assert r.status_code in (200, 201), r.text
    rc = reader.connection(controlplane)
    got = rc.key_manager.get(f"/secrets/{sid}/payload", headers={"Accept": "text/plain"})
    assert got.status_code == 200
    assert got.text == payload
    sc = stranger.connection(controlplane)
    refused = sc.key_manager.get(f"/secrets/{sid}/payload", headers={"Accept": "text/plain"})
    assert refused.status_code == 403
    # openstacksdk hides that 403 as payload=None: code must check for it
    assert sc.key_manager.get_secret(sid).payload is None


def test_application_credential_access_rules(controlplane: ControlPlane, make_user: Any) -> None:
    user: TestUser = make_user("appcred")
    conn = user.connection(controlplane)
    cred = conn.identity.create_application_credential(
        user=user.user_id,
        name="bed-rules",
        access_rules=[{"service": "image", "method": "GET", "path": "/v2/images"}],
    )
    auth = v3.ApplicationCredential(
        auth_url=controlplane.auth_url,
        application_credential_id=cred.id,
        application_credential_secret=cred.secret,
    )
    sess = ks_session.Session(auth=auth, verify=str(controlplane.ca_path))
    glance = controlplane.url("glance")
    allowed = sess.get(f"{glance}/v2/images", raise_exc=False)
    assert allowed.status_code == 200, allowed.text
    refused = sess.get(f"{glance}/v2/schemas/image", raise_exc=False)
    assert refused.status_code in (401, 403)
    barbican = controlplane.url("barbican")
    refused_kv = sess.get(f"{barbican}/v1/secrets", raise_exc=False)
    assert refused_kv.status_code in (401, 403)


def test_the_bed_is_shaped_as_production_says(controlplane: ControlPlane, admin: Any) -> None:
    """memcached behind Keystone's cache and Glance's token cache, four Keystone workers,
    SQLite in write-ahead-log mode (docs/production.md, docs/testbed.md)."""
    assert controlplane.shape == "production"
    workers = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and _ppid(int(pid)) == controlplane.pids["keystone"]
        and "worker" in _cmdline(int(pid))
    ]
    assert len(workers) == 4, workers
    for service in ("keystone", "glance", "barbican"):
        db = sqlite3.connect(controlplane.run_dir / service / f"{service}.db")
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.close()
    # a token Glance has validated once is taken from memcached the second time: Keystone
    # sees one validation for two Glance requests
    token = admin.session.get_token()
    log = controlplane.run_dir / "keystone" / "access.log"
    before = log.read_text().count('"GET /v3/auth/tokens')
    hits = controlplane.memcached_stats()["get_hits"]
    for _ in range(2):
        r = requests.get(
            f"{controlplane.url('glance')}/v2/images?limit=1",
            headers={"X-Auth-Token": token},
            verify=str(controlplane.ca_path),
            timeout=30,
        )
        assert r.status_code == 200
    assert log.read_text().count('"GET /v3/auth/tokens') - before <= 1
    assert controlplane.memcached_stats()["get_hits"] > hits


def test_keystone_refuses_a_disabled_users_token_on_every_thread(
    controlplane: ControlPlane, admin: Any, make_user: Any
) -> None:
    """Keystone validates a token before it makes the request's context; a thread's
    previous request context must not answer for it. Without the test bed's fresh context
    (serve.py), the thread that issued a token kept the user as it was then, and accepted
    the token once the user was disabled (1 of 24 requests, in each of 4 rounds)."""
    user: TestUser = make_user("disabled")
    admin.identity.get_user(user.user_id)  # the operator's own token issued before the steps
    ca = str(controlplane.ca_path)
    token = _password_token(controlplane, user)

    def read() -> int:
        return requests.get(
            f"{controlplane.auth_url}/projects/{user.project_id}",
            headers={"X-Auth-Token": token},
            verify=ca,
            timeout=30,
        ).status_code

    assert read() == 200
    admin.identity.update_user(user.user_id, is_enabled=False)
    # one request at a time, each on a new connection: the workers' threads take them in
    # turn, the one that issued the token among them (3 workers x 8 threads at most)
    after = [read() for _ in range(3 * 8)]
    assert after == [401] * len(after), after


def test_keystone_authorizes_each_request_with_its_own_token(
    controlplane: ControlPlane, make_user: Any
) -> None:
    """Keystone's auth middleware keeps the token it validated on itself; with several
    threads in a worker, a request was authorized with another thread's token. Measured
    with 8 threads per worker: a user creating application credentials with its password
    token was refused 93 times of 120 ("Using method 'application_credential' is not allowed
    for managing additional application credentials") while another user read its project
    with an application credential's token. The test bed runs Keystone one thread per
    worker; none is refused."""
    ca = str(controlplane.ca_path)
    url = controlplane.auth_url
    reader: TestUser = make_user("reader")
    manager: TestUser = make_user("manager")
    reader_token = _password_token(controlplane, reader)
    manager_token = _password_token(controlplane, manager)
    cred = requests.post(
        f"{url}/users/{reader.user_id}/application_credentials",
        headers={"X-Auth-Token": reader_token},
        json={"application_credential": {"name": "reader"}},
        verify=ca,
        timeout=30,
    ).json()["application_credential"]
    auth = {"methods": ["application_credential"], "application_credential": cred}
    r = requests.post(
        f"{url}/auth/tokens", json={"auth": {"identity": auth}}, verify=ca, timeout=30
    )
    cred_token = r.headers["X-Subject-Token"]
    stop = threading.Event()
    read_codes: collections.Counter[int] = collections.Counter()
    create_codes: collections.Counter[int] = collections.Counter()

    def read() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                got = s.get(
                    f"{url}/projects/{reader.project_id}",
                    headers={"X-Auth-Token": cred_token},
                    verify=ca,
                    timeout=30,
                )
                read_codes[got.status_code] += 1

    def manage() -> None:
        with requests.Session() as s:
            for _ in range(30):
                made = s.post(
                    f"{url}/users/{manager.user_id}/application_credentials",
                    headers={"X-Auth-Token": manager_token},
                    json={"application_credential": {"name": secrets.token_hex(4)}},
                    verify=ca,
                    timeout=30,
                )
                create_codes[made.status_code] += 1
                if made.status_code == 201:
                    cid = made.json()["application_credential"]["id"]
                    s.delete(
                        f"{url}/users/{manager.user_id}/application_credentials/{cid}",
                        headers={"X-Auth-Token": manager_token},
                        verify=ca,
                        timeout=30,
                    )

    readers = [threading.Thread(target=read) for _ in range(6)]
    managers = [threading.Thread(target=manage) for _ in range(2)]
    for t in readers + managers:
        t.start()
    for t in managers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert dict(create_codes) == {201: 60}, create_codes
    assert set(read_codes) == {200} and read_codes[200] > 0, read_codes


def _password_token(controlplane: ControlPlane, user: TestUser) -> str:
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"id": user.user_id, "password": user.password}},
            },
            "scope": {"project": {"id": user.project_id}},
        }
    }
    r = requests.post(
        f"{controlplane.auth_url}/auth/tokens",
        json=body,
        verify=str(controlplane.ca_path),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return str(r.headers["X-Subject-Token"])


def _ppid(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_bulk_identities_are_nodes_as_keystone_serves_them(
    controlplane: ControlPlane, admin: Any
) -> None:
    """The fleet benchmark's set-up (Keystone's managers, no API) gives each node what
    enrollment gives it: a credential that issues a token for its own project only, with
    its roles (the implied reader included: Glance asks for it) and its access rules."""
    import json
    import uuid

    from provisioner.node import credentials

    domain_id = admin.identity.find_domain("edge", ignore_missing=False).id
    member_id = admin.identity.find_role("member", ignore_missing=False).id
    records = []
    for _ in range(3):
        project_id = uuid.uuid4().hex
        records.append(
            {
                "project_id": project_id,
                "name": f"bulk-{secrets.token_hex(5)}",
                "domain_id": domain_id,
                "role_id": member_id,
                "cred_id": uuid.uuid4().hex,
                "cred_name": credentials.NODE_CREDENTIAL_NAME,
                "secret": secrets.token_urlsafe(48),
                "access_rules": credentials.access_rules(project_id),
                "attrs": {"edgepin_assignment": json.dumps({"for": project_id})},
            }
        )
    counts: list[int] = []
    made = controlplane.bulk_identities(records, counts.append)
    assert sorted(counts) == [1, 2, 3]
    assert {m["project_id"] for m in made} == {r["project_id"] for r in records}
    glance = controlplane.url("glance")
    for rec, other in zip(records, records[1:] + records[:1], strict=True):
        auth = v3.ApplicationCredential(
            auth_url=controlplane.auth_url,
            application_credential_id=rec["cred_id"],
            application_credential_secret=rec["secret"],
        )
        sess = ks_session.Session(auth=auth, verify=str(controlplane.ca_path))
        ks = controlplane.auth_url
        mine = sess.get(f"{ks}/projects/{rec['project_id']}", raise_exc=False)
        assert mine.status_code == 200, mine.text
        assert json.loads(mine.json()["project"]["edgepin_assignment"]) == {
            "for": rec["project_id"]
        }
        roles = set(sess.auth.get_access(sess).role_names)
        assert {"member", "reader"} <= roles
        assert sess.get(f"{glance}/v2/images", raise_exc=False).status_code == 200
        theirs = sess.get(f"{ks}/projects/{other['project_id']}", raise_exc=False)
        assert theirs.status_code in (401, 403)
        outside = sess.get(f"{glance}/v2/schemas/image", raise_exc=False)
        assert outside.status_code in (401, 403)
        wrong = v3.ApplicationCredential(
            auth_url=controlplane.auth_url,
            application_credential_id=rec["cred_id"],
            application_credential_secret=other["secret"],
        )
        bad = ks_session.Session(auth=wrong, verify=str(controlplane.ca_path))
        with pytest.raises(ks_exceptions.Unauthorized):
            bad.get(f"{ks}/projects/{rec['project_id']}")
        sess.session.close()
        bad.session.close()
