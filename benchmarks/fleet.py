"""4. Fleet: N simulated nodes reconcile against one test bed.

Each node has its own Keystone project, user and application credential (with the
node's least-privilege access rules) and its own assignment; the image is shared with
its project. No TPM, no libvirt: a simulated node runs the provisioner's own protocol
code (``credentials.make_session`` + ``NodeClient.assignment``, and in the
"metadata" round ``NodeClient.image`` + ``fetch.check_properties``), with a new
session per reconcile, as the node's timer-started process has. A reconcile with a
kept token is what a node does between token issues (``provisioner/node/token.py``): a
new process, a new TLS connection, the token it kept from its last run, one request.

Baseline: the same nodes each make one unauthenticated HTTPS GET of Keystone's
version document on a new connection: the floor of any request to this control plane.
"""

from __future__ import annotations

import datetime
import json
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from keystoneauth1 import session as ksa_session

from benchmarks import procstat, servicelog, stats
from benchmarks.bed import Bed, BenchError
from provisioner import assignment
from provisioner.node import credentials, fetch
from provisioner.node.client import NodeClient
from provisioner.operator import assign, nodes
from provisioner.operator.signingcert import load_key
from provisioner.signing import fingerprint, load_certificate
from tests.testbed.controlplane import EDGE_DOMAIN, REGION


@dataclass
class SimNode:
    ident: credentials.Identity
    cred_id: str
    secret: str
    generation: int
    image_id: str
    pins: dict[str, x509.Certificate]  # what signs its assignment, as a node pins it


@dataclass(frozen=True)
class _AssignmentKey:
    """The bed's signing key, which signs the simulated nodes' assignments."""

    key: Any
    cert: x509.Certificate
    image_sha512: str

    def record(self, project_id: str, name: str, image_id: str) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        sha = self.image_sha512
        return assignment.sign(self.key, self.cert, project_id, name, image_id, sha, 1, now)


def _retry(call: Callable[[], Any], attempts: int = 8) -> Any:
    """Set-up calls only: SQLite under the test bed answers 500 ("database is locked")
    now and then under load, sometimes several times in a row; back off up to ~10 s."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:  # set-up only; the measured rounds never retry
            if attempt == attempts - 1:
                raise
            time.sleep(min(10.0, 0.5 * 2**attempt) * (0.5 + random.random()))  # noqa: S311
    raise AssertionError("unreachable")


def make_fleet(
    bed: Bed,
    n: int,
    image_id: str,
    log: Callable[[str], None],
    fleet: list[SimNode] | None = None,
    *,
    share: bool = True,
    workers: int = 2,
) -> list[SimNode]:
    """Enroll simulated nodes until there are ``n`` (those in ``fleet`` are kept).

    Each node gets what ``edgepin enroll`` gives a node in Keystone: its own project with
    its signed assignment, its own user with the member role there, and an application
    credential for that project with the node's access rules. They are made in two
    processes through Keystone's own managers (``ControlPlane.bulk_identities``), which
    takes minutes for 10,000 nodes where six API calls per node took hours on this bed;
    the rounds measured afterwards go through the API only.

    With ``share`` the image is also shared with each node's project (``workers`` at a
    time), which only the round that reads the image's metadata needs: Glance reads the
    image's whole member list on every new member, so sharing one image with 10,000
    projects alone takes half an hour here (docs/performance.md, placement).
    """
    made: list[SimNode] = list(fleet or [])
    if len(made) >= n:
        return made[:n]
    have = len(made)
    admin = bed.admin
    domain_id = admin.identity.find_domain(EDGE_DOMAIN, ignore_missing=False).id
    member_id = admin.identity.find_role("member", ignore_missing=False).id
    signer = bed.make_signer()
    signs = _AssignmentKey(
        load_key(admin, signer.key_id),
        load_certificate(signer.pem_path.read_bytes()),
        admin.image.get(f"/images/{image_id}").json()["os_hash_value"],
    )
    pins = {fingerprint(signs.cert): signs.cert}
    t0 = time.monotonic()
    records: list[dict[str, Any]] = []
    secret_of: dict[str, tuple[str, str]] = {}
    for _ in range(n - have):
        name = f"bench-{secrets.token_hex(6)}"
        project_id = uuid.uuid4().hex
        secret_of[name] = (uuid.uuid4().hex, secrets.token_urlsafe(48))
        record = signs.record(project_id, name, image_id)
        records.append(
            {
                "project_id": project_id,
                "name": name,
                "domain_id": domain_id,
                "role_id": member_id,
                "cred_id": secret_of[name][0],
                "cred_name": credentials.NODE_CREDENTIAL_NAME,
                "secret": secret_of[name][1],
                "access_rules": credentials.access_rules(project_id),
                "attrs": {nodes.ASSIGNMENT_ATTR: json.dumps(record, sort_keys=True)},
            }
        )

    def progress(count: int) -> None:
        if count % 1000 == 0 or count == len(records):
            log(f"fleet: {have + count}/{n} nodes enrolled ({time.monotonic() - t0:.0f}s)")

    for got in bed.cp.bulk_identities(records, progress):
        cred_id, secret = secret_of[got["name"]]
        ident = credentials.Identity(
            node_id=got["name"],
            project_id=got["project_id"],
            user_id=got["user_id"],
            auth_url=bed.cp.auth_url,
            region=REGION,
            interface="public",
            ca_file=bed.cp.ca_path,
        )
        made.append(SimNode(ident, cred_id, secret, 1, image_id, pins))
    if share:
        local = threading.local()

        def one(node: SimNode) -> None:
            if not hasattr(local, "admin"):
                local.admin = bed.cp.admin_connection()
            _retry(lambda: assign.share(local.admin, image_id, node.ident.project_id))

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, made[have:]))
        log(f"fleet: image shared with {n - have} nodes ({time.monotonic() - t0:.0f}s)")
    return made


def _baseline(node: SimNode) -> None:
    sess = ksa_session.Session(verify=str(node.ident.ca_file))
    try:
        sess.get(node.ident.auth_url, authenticated=False).raise_for_status()
    finally:
        sess.session.close()


def _reconcile(node: SimNode, metadata: bool, kept: dict[str, str] | None = None) -> None:
    """A reconcile that issues a token; with ``kept``, the node keeps that token there."""
    sess = credentials.make_session(node.ident, node.cred_id, node.secret, 30.0)
    try:
        client = NodeClient(sess, node.ident)
        a = client.assignment(node.pins)
        if not a or a.generation != node.generation:
            raise BenchError(f"node {node.ident.node_id} read a wrong assignment")
        if metadata:
            image = client.image(a.image_id)
            fetch.check_properties(image)
            fetch.check_assigned(image, a)
        if kept is not None:
            kept[node.ident.node_id] = sess.auth.get_auth_state()
    finally:
        sess.session.close()


def _reconcile_kept(node: SimNode, kept: dict[str, str]) -> None:
    """A reconcile with the token the node kept: a new session (the node's timer starts a
    new process), the kept token restored, one request on a new TLS connection."""
    sess = credentials.make_session(node.ident, node.cred_id, node.secret, 30.0)
    try:
        sess.auth.set_auth_state(kept[node.ident.node_id])
        a = NodeClient(sess, node.ident).assignment(node.pins)
        if not a or a.generation != node.generation:
            raise BenchError(f"node {node.ident.node_id} read a wrong assignment")
    finally:
        sess.session.close()


def _round(
    bed: Bed,
    fleet: list[SimNode],
    rounds: int,
    concurrency: int,
    work: Callable[[SimNode], None],
    tolerate_errors: bool = False,
) -> dict[str, Any]:
    order = [node for _ in range(rounds) for node in random.sample(fleet, len(fleet))]
    pgids = bed.service_pgids()
    logs = servicelog.AccessLogs(bed.cp.run_dir)
    cpu0 = {s: procstat.group_cpu_seconds(p) for s, p in pgids.items()}
    client0 = procstat.self_cpu_seconds()
    latencies: list[float] = []
    errors: list[str] = []

    def timed(node: SimNode) -> None:
        t0 = time.monotonic()
        try:
            work(node)
        except Exception as e:  # counted and reported, never hidden
            errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        latencies.append(time.monotonic() - t0)

    cached = "memcached" in bed.cp.ports
    mc0 = bed.cp.memcached_stats() if cached else {}
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, order))
    wall = time.monotonic() - t0
    mc1 = bed.cp.memcached_stats() if cached else {}
    memcached = {k: mc1.get(k, 0) - mc0.get(k, 0) for k in ("get_hits", "get_misses", "evictions")}
    if cached:  # what the cache holds after the round, against its size
        memcached.update({k: mc1.get(k, 0) for k in ("curr_items", "bytes", "limit_maxbytes")})
    time.sleep(0.5)  # let the access logs catch up
    cpu = {s: procstat.group_cpu_seconds(p) - cpu0[s] for s, p in pgids.items()}
    client = procstat.self_cpu_seconds() - client0
    reqs = logs.since()
    count = len(order)
    counts = servicelog.summarize(reqs)
    # a rare 500 from the test bed's SQLite ("database is locked") is reported in the
    # table, not fatal; more than 1 % failing means the figures are not worth reading
    if errors and not tolerate_errors and len(errors) > count // 100:
        raise BenchError(f"fleet: {len(errors)} of {count} reconciles failed, e.g. {errors[0]}")
    return {
        "reconciles": count,
        "seconds": wall,
        "per_second": count / wall,
        "errors": len(errors),
        "error_sample": errors[:3],
        "p50": stats.percentile(latencies, 50) if latencies else None,
        "p99": stats.percentile(latencies, 99) if latencies else None,
        "requests_per_node": {k: v / count for k, v in counts.items()},
        "cpu_seconds_per_reconcile": {s: v / count for s, v in cpu.items()},
        "cpu_seconds_per_reconcile_all_services": sum(cpu.values()) / count,
        "client_cpu_seconds_per_reconcile": client / count,
        "routes": {s: servicelog.by_route(r) for s, r in reqs.items()},
        # the production-shaped bed's cache (64 MiB): hits, misses, evictions in the round
        "memcached": memcached if cached else None,
    }


# Keystone's cache as production runs it (memcached), the closest a single gunicorn worker
# gets without a memcached server: the in-process dogpile backend. The test bed runs
# Keystone with ``[cache] enabled = false``; ``ControlPlane.reconfigured`` restores that.
KEYSTONE_CACHE = {"enabled": "true", "backend": "dogpile.cache.memory"}


def bench_fleet(
    bed: Bed,
    n: int,
    image_id: str,
    rounds: int,
    concurrency: int,
    log: Callable[[str], None],
    with_keystone_cache: bool = False,
    fleet: list[SimNode] | None = None,
    variants: bool = True,
) -> tuple[dict[str, Any], list[SimNode]]:
    """Baseline, no-change (a new token each) and kept-token rounds on ``n`` nodes; with
    ``variants``, also the image-metadata (and Keystone-cache) rounds. Returns the nodes,
    so that a bigger fleet can grow from them (only the first size shares the image)."""
    t0 = time.monotonic()
    have = len(fleet or [])
    fleet = make_fleet(bed, n, image_id, log, fleet, share=variants, workers=concurrency)
    setup = time.monotonic() - t0
    log(f"fleet: {n - have} nodes enrolled in {setup:.0f}s ({n} in all); baseline round")
    base = _round(bed, fleet, rounds, concurrency, _baseline)
    log(f"fleet N={n}: no-change reconciles issuing a token, {rounds} round(s)")
    kept: dict[str, str] = {}
    nochange = _round(bed, fleet, rounds, concurrency, lambda node: _reconcile(node, False, kept))
    log(f"fleet N={n}: no-change reconciles with the kept token, {rounds} round(s)")
    kept_token = _round(bed, fleet, rounds, concurrency, lambda node: _reconcile_kept(node, kept))
    result: dict[str, Any] = {
        "nodes": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "setup_seconds": setup,
        "setup_nodes": n - have,
        "setup_workers": concurrency,
        "setup_through": "keystone managers (tests/testbed/keystone_bulk.py)",
        "image_shared": variants,
        "baseline": base,
        "nochange": nochange,
        "kept_token": kept_token,
    }
    if not variants:
        return result, fleet
    log("fleet: reconciles that also read the image metadata (an assignment change)")
    result["metadata"] = _round(bed, fleet, 1, concurrency, lambda node: _reconcile(node, True))
    if with_keystone_cache and bed.shape != "production":
        log("fleet: Keystone with its cache on: no-change reconciles, then with a kept token")
        with bed.cp.reconfigured("keystone", "cache", KEYSTONE_CACHE):
            kept = {}
            result["keystone_cache_nochange"] = _round(
                bed, fleet, rounds, concurrency, lambda node: _reconcile(node, False, kept), True
            )
            result["keystone_cache_kept_token"] = _round(
                bed, fleet, rounds, concurrency, lambda node: _reconcile_kept(node, kept), True
            )
    return result, fleet
