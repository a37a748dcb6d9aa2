"""Secret ACLs derived from the nodes' records (pure logic, fake Keystone and Barbican).

The integration test (tests/integration/test_assign_concurrency.py) runs many assigns at
once against the real services; this one forces the one interleaving that loses an entry
with read-modify-write, every time, and shows that ``access.sync`` still ends right.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, field
from time import sleep as real_sleep

import pytest

from provisioner import barbican
from provisioner.errors import NotFoundError, ServiceUnavailableError
from provisioner.operator import access, nodes

pytestmark = pytest.mark.unit

KEY = "11111111-1111-1111-1111-111111111111"


@dataclass
class Cloud:
    """Node records (Keystone) and read ACLs (Barbican), as plain data."""

    records: dict[str, list[str]] = field(default_factory=dict)  # user id -> secrets
    acls: dict[str, list[str]] = field(default_factory=dict)  # secret id -> users
    lock: threading.Lock = field(default_factory=threading.Lock)
    puts: int = 0

    def fleet(self) -> list[nodes.Node]:
        with self.lock:
            return [
                nodes.Node(
                    f"node-{uid}",
                    {"id": f"p-{uid}", nodes.GRANTS_ATTR: json.dumps({"secrets": sids})},
                    {"id": uid},
                )
                for uid, sids in self.records.items()
            ]


@dataclass
class Client:
    """One writer's Barbican client; ``hold`` pauses its first ACL write."""

    name: str
    hold: threading.Event | None = None
    holding: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Cloud:
    c = Cloud()

    def acl_users(client: Client, sid: str) -> list[str]:
        with c.lock:
            if sid not in c.acls:
                raise NotFoundError("no such secret", secret_id=sid)
            return list(c.acls[sid])

    def set_acl_users(client: Client, sid: str, users: list[str]) -> None:
        if client.hold is not None and not client.holding.is_set():
            client.holding.set()
            assert client.hold.wait(10)
        with c.lock:
            c.acls[sid] = sorted(set(users))
            c.puts += 1

    monkeypatch.setattr(nodes, "list_nodes", lambda conn, domain_id: c.fleet())
    monkeypatch.setattr(barbican, "acl_users", acl_users)
    monkeypatch.setattr(barbican, "set_acl_users", set_acl_users)
    monkeypatch.setattr(access.time, "sleep", lambda s: None)
    return c


def test_wanted_and_the_list_to_write() -> None:
    fleet = [
        nodes.Node("a", {"id": "pa", nodes.GRANTS_ATTR: '{"secrets": ["k", "c"]}'}, {"id": "ua"}),
        nodes.Node("b", {"id": "pb", nodes.GRANTS_ATTR: '{"secrets": ["c"]}'}, {"id": "ub"}),
        nodes.Node("n", {"id": "pn"}, None),
    ]
    assert access.wanted(fleet, ["k", "c", "x"]) == {
        "k": frozenset({"ua"}),
        "c": frozenset({"ua", "ub"}),
        "x": frozenset(),
    }
    managed = access.node_users(fleet)
    # a node user its record does not justify goes, a user that is not a node stays
    assert access.acl_list(["ub", "operator"], managed, frozenset({"ua"})) == ["operator", "ua"]


def test_a_stale_write_is_repaired_before_its_writer_returns(cloud: Cloud) -> None:
    """A reads the records, then B records, writes and returns, then A's stale list lands:
    exactly the interleaving in which read-modify-write loses B. A's re-read repairs it."""
    cloud.acls[KEY] = []
    cloud.records["a"] = [KEY]
    slow = Client("A", hold=threading.Event())
    errors: list[BaseException] = []

    def writer_a() -> None:
        try:
            access.sync(None, "edge", [KEY], client=slow)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=writer_a)
    t.start()
    assert slow.holding.wait(10)  # A has computed ["a"] and is about to write it
    cloud.records["b"] = [KEY]
    assert access.sync(None, "edge", [KEY], client=Client("B")) == {KEY: ["a", "b"]}
    assert cloud.acls[KEY] == ["a", "b"]
    assert slow.hold is not None
    slow.hold.set()  # A's stale ["a"] lands now, after B has returned
    t.join(10)
    assert not t.is_alive() and not errors
    assert cloud.acls[KEY] == ["a", "b"]


def test_withdrawal_and_a_deleted_secret(cloud: Cloud) -> None:
    cloud.acls[KEY] = ["a", "b", "operator"]
    cloud.records = {"a": [KEY], "b": []}
    assert access.sync(None, "edge", [KEY, "gone"], client=Client("X")) == {
        KEY: ["a"],
        "gone": [],
    }
    assert cloud.acls[KEY] == ["a", "operator"]
    # a secret a record still names must exist
    cloud.records["b"] = ["gone"]
    with pytest.raises(NotFoundError):
        access.sync(None, "edge", ["gone"], client=Client("X"))


def test_a_refused_write_is_written_again_then_reported(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud.acls[KEY] = []
    cloud.records = {"a": [KEY]}
    real = barbican.set_acl_users
    refusals = [1]

    def flaky(client: Client, sid: str, users: list[str]) -> None:
        if refusals:
            refusals.pop()
            raise ServiceUnavailableError("barbican: database is locked")
        real(client, sid, users)

    monkeypatch.setattr(barbican, "set_acl_users", flaky)
    assert access.sync(None, "edge", [KEY], client=Client("X")) == {KEY: ["a"]}
    assert cloud.acls[KEY] == ["a"]

    def never(client: Client, sid: str, users: list[str]) -> None:
        raise ServiceUnavailableError("barbican: database is locked")

    monkeypatch.setattr(barbican, "set_acl_users", never)
    with pytest.raises(ServiceUnavailableError) as e:
        access.sync(None, "edge", [KEY], client=Client("X"), deadline_s=0.0)
    assert KEY in e.value.message and "run the command again" in (e.value.hint or "")


def test_many_writers_with_random_delays_end_right(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen writers, each moving its node between two secrets, with every ACL write
    landing after a random delay (so stale lists land late, out of order)."""
    other = "22222222-2222-2222-2222-222222222222"
    cloud.acls = {KEY: [], other: []}
    cloud.records = {f"u{i:02d}": [KEY] for i in range(16)}
    real = barbican.set_acl_users
    rnd = random.Random(7)

    def late(client: Client, sid: str, users: list[str]) -> None:
        real_sleep(rnd.random() / 200)  # access.time.sleep is patched out
        real(client, sid, users)

    monkeypatch.setattr(barbican, "set_acl_users", late)
    start = threading.Barrier(16)

    def writer(uid: str, to: str) -> None:
        start.wait()
        with cloud.lock:
            cloud.records[uid] = [to]
        access.sync(None, "edge", [KEY, other], client=Client(uid))

    threads = [
        threading.Thread(target=writer, args=(uid, other if i % 2 else KEY))
        for i, uid in enumerate(sorted(cloud.records))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert cloud.acls[KEY] == [f"u{i:02d}" for i in range(0, 16, 2)]
    assert cloud.acls[other] == [f"u{i:02d}" for i in range(1, 16, 2)]


def test_an_acl_too_large_for_barbican_is_reported_at_once(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Barbican's 413 (the list is longer than max_allowed_request_size_in_bytes) is no busy
    database: writing it again cannot help, so it is not."""
    cloud.acls[KEY] = []
    cloud.records = {"a": [KEY]}
    writes = []

    def too_large(client: Client, sid: str, users: list[str]) -> None:
        writes.append(sid)
        barbican._check(413, sid, "setting the ACL of")

    monkeypatch.setattr(barbican, "set_acl_users", too_large)
    with pytest.raises(barbican.RequestTooLarge) as e:
        access.sync(None, "edge", [KEY], client=Client("X"))
    assert writes == [KEY] and "max_allowed_request_size_in_bytes" in (e.value.hint or "")
