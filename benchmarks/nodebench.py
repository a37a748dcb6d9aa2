"""3. A reconcile with nothing to change, and an offline reconcile, on a virtual node.

The node is the integration tests' VirtualNode: a swtpm, an isolated libvirtd and the
real ``edgepin node ...`` commands, enrolled and assigned with the test bed's operator steps,
running the tiny test guest under software emulation.

Requests are counted at loopback proxies (tests.testbed.faultproxy) in front of Keystone,
Glance and Barbican: the node enrolls with its seed's auth URL pointing at the Keystone
proxy (its ledger keeps that URL from then on), and the catalog's public image and
key-manager endpoints point at the other two while measuring. Its ``/run`` is in memory, as
on a node, so it keeps its token between reconciles. Offline means the proxies are stopped.

Baseline: a fresh Python process that authenticates with keystoneauth and makes one GET
(what ``openstack token issue`` plus one call costs), measured in the same run.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from benchmarks import procstat, servicelog, stats
from benchmarks.bed import Bed, BenchError
from tests.testbed.faultproxy import FaultProxy
from tests.testbed.guest import MARKER_PREFIX, build_tiny_guest
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.node import VirtualNode
from tests.testbed.operator import Signer as TestSigner
from tests.testbed.operator import assign, enroll_node
from tests.testbed.swtpm import SwtpmFactory

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def _endpoints(admin: Any, urls: dict[str, str]) -> Iterator[None]:
    """Point the catalog's public endpoints of these service types at other URLs."""
    saved = []
    for stype, url in urls.items():
        service = next(s for s in admin.identity.services() if s.type == stype)
        ep = next(iter(admin.identity.endpoints(service_id=service.id, interface="public")))
        saved.append((ep, ep.url))
        admin.identity.update_endpoint(ep, url=url)
    try:
        yield
    finally:
        for ep, url in saved:
            admin.identity.update_endpoint(ep, url=url)


def _bundle(node: VirtualNode) -> Path:
    return node.root / "var" / "lib" / "edgepin" / "seed" / "bundle.json"


@contextmanager
def _auth_url(node: VirtualNode, url: str) -> Iterator[None]:
    path = _bundle(node)
    original = path.read_bytes()
    data = json.loads(original)
    data["auth_url"] = url
    path.write_text(json.dumps(data))
    try:
        yield
    finally:
        path.write_bytes(original)


class _Markers:
    """Tells when the guest prints its marker anew on the serial log: more markers than
    there were, or any marker once the log has been rewritten (it got shorter)."""

    def __init__(self, node: VirtualNode, marker: str) -> None:
        self.path = node.serial_log
        self.needle = f"{MARKER_PREFIX} {marker}".encode()
        self.size, self.count = self._read()

    def _read(self) -> tuple[int, int]:
        data = self.path.read_bytes() if self.path.exists() else b""
        return len(data), data.count(self.needle)

    def new(self) -> bool:
        size, count = self._read()
        if size < self.size:  # rewritten: whatever it holds now is new
            self.count = 0
        self.size = size
        return count > self.count


def _baseline(bed: Bed) -> float:
    cfg = bed.admin_auth()
    r = procstat.run(
        [sys.executable, "-m", "benchmarks.worker", "token-get"], stdin=json.dumps(cfg).encode()
    )
    if r.returncode != 0:
        raise BenchError(f"baseline worker failed: {r.stderr.decode(errors='replace')[-400:]}")
    return r.seconds


def _reconcile(node: VirtualNode) -> float:
    t0 = time.monotonic()
    r = node.node("reconcile")
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"edgepin node reconcile failed: {r.stderr.strip()[-600:]}")
    return seconds


def bench_node(bed: Bed, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    run_dir = bed.run_dir / "node"
    factory = SwtpmFactory(run_dir / "swtpm")
    lv = Libvirtd(run_dir / "libvirt")
    proxies: list[FaultProxy] = []
    memory: Path | None = None
    try:
        tpm = factory.create("bench")
        lv.start()
        node = VirtualNode(f"n{secrets.token_hex(4)}", run_dir / "root", tpm, lv)
        node.root.mkdir(parents=True)
        # a node's /run is in memory (tmpfs), and the node keeps its token only there
        memory = Path(tempfile.mkdtemp(prefix="edgepin-bench-", dir="/dev/shm"))
        (node.root / "run").symlink_to(memory)
        s = bed.make_signer()
        signer = TestSigner(s.cert_id, s.key_id, s.sha256, s.pem_path.read_bytes())
        marker = f"m{secrets.token_hex(5)}"
        guest = build_tiny_guest(REPO / ".cache", run_dir / "guest.qcow2", marker, "run")
        # counting proxies in front of the three services: the node enrolls through the
        # Keystone one (its ledger keeps that URL, as it keeps the seed's), and the catalog
        # points at the Glance and Barbican ones during the counted reconciles
        tls = bed.cp.run_dir / "tls"
        for svc in ("keystone", "glance", "barbican"):
            p = FaultProxy(
                bed.cp.url(svc), bed.cp.ca_path, tls / "server.pem", tls / "server-key.pem"
            )
            proxies.append(p.start())
        ks, gl, bb = proxies
        log("reconcile: publishing the tiny guest, enrolling a virtual node")
        pub = bed.publish(guest)
        enroll_node(node, bed.cli_env, signer, run_dir)
        with _auth_url(node, f"{ks.url}/v3"):
            if node.node("enroll").returncode != 0:
                raise BenchError("edgepin node enroll failed")
        assign(bed.signing_env(), node, pub["image_id"])
        log("reconcile: first reconcile (fetch, start the guest)")
        first = _reconcile(node)
        if json.loads(node.status_path.read_text())["state"] != "running":
            raise BenchError("the first reconcile did not leave a running guest")

        log(f"reconcile: {runs} no-change reconciles behind counting proxies")
        baselines, walls, counts, logged = [], [], [], []
        with _endpoints(bed.admin, {"image": gl.url, "key-manager": bb.url}):
            for _ in range(runs):
                baselines.append(_baseline(bed))
                for p in proxies:
                    p.requests.clear()
                logs = servicelog.AccessLogs(bed.cp.run_dir)
                walls.append(_reconcile(node))
                counts.append(
                    {
                        n: list(p.requests)
                        for n, p in zip(("keystone", "glance", "barbican"), proxies, strict=True)
                    }
                )
                time.sleep(0.3)
                logged.append(servicelog.summarize(logs.since()))
        st = json.loads(node.status_path.read_text())
        if st["state"] != "running":
            raise BenchError(f"no-change reconcile left state {st['state']}")

        log("reconcile: offline reconcile (control plane unreachable, guest stopped)")
        conn = libvirt.open(lv.uri)
        try:
            conn.lookupByName("edgepin-guest").destroy()
        finally:
            conn.close()
        markers = _Markers(node, marker)
        for p in proxies:  # the control plane out of the node's reach: connections refused
            p.stop()
        t0 = time.monotonic()
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.append(_reconcile(node)))
        worker.start()
        to_marker = None
        while time.monotonic() - t0 < 120:
            if to_marker is None and markers.new():
                to_marker = time.monotonic() - t0
            if to_marker is not None and not worker.is_alive():
                break
            time.sleep(0.05)
        worker.join()
        if not result:
            raise BenchError("the offline reconcile failed")
        offline = result[0]
        st = json.loads(node.status_path.read_text())
        if st["state"] != "offline":
            raise BenchError(f"offline reconcile ended in state {st['state']}")
    finally:
        for p in proxies:
            p.stop()
        lv.stop()
        factory.stop_all()
        if memory is not None:
            shutil.rmtree(memory, ignore_errors=True)
    per_run = [{n: len(r) for n, r in c.items()} for c in counts]
    tokens = [sum(1 for r in c["keystone"] if r.startswith("POST /v3/auth/tokens")) for c in counts]
    base = stats.median(baselines)
    return {
        "first_reconcile_seconds": first,
        "nochange_seconds": walls,
        "nochange_seconds_median": stats.median(walls),
        "baseline_seconds": baselines,
        "baseline_seconds_median": base,
        "nochange_vs_baseline": stats.ratio(stats.median(walls), base),
        "requests_at_proxies": per_run,
        "requests_total_median": stats.median([sum(x.values()) for x in per_run]),
        "requests_seen": counts[-1],
        "tokens_issued_median": stats.median(tokens),
        "access_logs": logged,
        "offline_reconcile_seconds": offline,
        "offline_vs_baseline": stats.ratio(offline, base),
        "offline_to_guest_marker_seconds": to_marker,
        "offline_state": st["state"],
    }
