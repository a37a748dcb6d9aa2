"""A real single-node Ceph cluster for the test bed: one mon, one mgr, one BlueStore OSD.

Debian's packages (ceph-mon, ceph-mgr, ceph-osd, ceph-common), no systemd, no cephadm.
Every file lives under ``<run_dir>``: configuration, keyrings (mode 0600), mon store,
the OSD's sparse block file, admin sockets and logs. Daemons listen on 127.0.0.1 only
(msgr2), run in their own session, and are stopped by pid. cephx is on everywhere.

Keys never reach a command line or a log: keyrings are created by ``ceph-authtool`` and
``ceph auth get-or-create -o FILE`` straight into files, and every client finds its
keyring through the configuration file (``[client] keyring = .../$cluster.$name.keyring``).

Command line (for debugging; ``./build.sh controlplane up --store ceph`` uses it)::

    python -m tests.testbed.ceph up|down|status [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testbed.process import free_port, stop_group, write_private

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("mon", "mgr", "osd")
BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")
IMAGES_POOL = "images"
GLANCE_USER = "glance"
# what the Glance user may do: RBD on the images pool, nothing else
GLANCE_CAPS = ("mon", "profile rbd", "osd", f"profile rbd pool={IMAGES_POOL}")


class CephError(RuntimeError):
    """The Ceph cluster could not be started, used or stopped."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ceph_conf(d: Path, fsid: str, mon_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
mon_initial_members = a
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_msgr1 = false
run_dir = {d}/run
crash_dir = {d}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 500
mon_data_avail_warn = 2
mon_data_avail_crit = 1
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[mon]
mon_data = {d}/mon/$cluster-$id
log_file = {d}/log/$cluster-$name.log
admin_socket = {d}/run/$cluster-$name.asok

[mgr]
mgr_data = {d}/mgr/$cluster-$id
log_file = {d}/log/$cluster-$name.log
admin_socket = {d}/run/$cluster-$name.asok

[osd]
osd_data = {d}/osd/$cluster-$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 10737418240
osd_memory_target = 1073741824
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
log_file = {d}/log/$cluster-$name.log
admin_socket = {d}/run/$cluster-$name.asok

[client]
keyring = {d}/keys/$cluster.$name.keyring
"""


@dataclass
class CephCluster:
    run_dir: Path
    fsid: str = ""
    mon_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.run_dir / "ceph.conf"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "ceph.json"

    def keyring(self, client: str) -> Path:
        """The keyring of ``client.<client>`` (mode 0600; never print it)."""
        return self.run_dir / "keys" / f"ceph.client.{client}.keyring"

    # ---------------------------------------------------------------- lifecycle

    def up(self, timeout: float = 180.0) -> None:
        missing = missing_binaries()
        if missing:
            raise CephError(
                f"Ceph is not installed ({', '.join(missing)} missing): "
                "apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd ceph-common"
            )
        if self.state_path.exists() and self.alive():
            raise CephError(f"a Ceph cluster already runs in {self.run_dir}")
        t0 = time.monotonic()
        d = self.run_dir
        if d.exists():  # leftovers of an earlier run: a cluster is always made fresh
            shutil.rmtree(d)
        for sub in ("run", "crash", "log", "keys", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "keys", 0o700)
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.conf.write_text(ceph_conf(d, self.fsid, self.mon_port))
        self._save_state()

        # keys: the mon's own, and client.admin's (imported into the mon's keyring)
        conf = str(self.conf)
        mon_keyring = d / "mon" / "bootstrap.keyring"
        admin = self.keyring("admin")
        self._new_key(mon_keyring, "mon.", {"mon": "allow *"})
        self._new_key(admin, "client.admin", {t: "allow *" for t in ("mon", "osd", "mgr", "mds")})
        self._run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(admin)])
        monmap = d / "mon" / "monmap"
        mon_addr = f"[v2:127.0.0.1:{self.mon_port}]"
        self._run(
            ["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", mon_addr, str(monmap)]
        )
        mkfs = ["--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring)]
        self._run(["ceph-mon", "-c", conf, *mkfs])
        mon_keyring.unlink()  # the mon keeps its key in its own store
        self._spawn("mon", ["ceph-mon", "-f", "-c", conf, "-i", "a"])
        self._wait(lambda: self._quiet_ok(["ceph", "mon", "stat"]), 60, "mon quorum")
        self.timings["mon"] = time.monotonic() - t0

        # mgr (the cluster reports PG states through it)
        mgr_keyring = d / "mgr" / "ceph-x" / "keyring"
        write_private(mgr_keyring, b"")
        mgr_caps = ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"]
        self.ceph(["auth", "get-or-create", "mgr.x", *mgr_caps, "-o", str(mgr_keyring)])
        self._spawn("mgr", ["ceph-mgr", "-f", "-c", conf, "-i", "x"])

        # one BlueStore OSD on a sparse file inside its data folder
        osd_uuid = str(uuid.uuid4())
        osd_keyring = d / "osd" / "ceph-0" / "keyring"
        self._new_key(osd_keyring, "osd.0", {})
        osd_id = self.ceph(["osd", "new", osd_uuid]).strip()
        if osd_id != "0":
            raise CephError(f"expected osd.0, the monitor made osd.{osd_id}")
        osd_caps = ["osd", "allow *", "mon", "allow profile osd", "mgr", "allow profile osd"]
        self.ceph(["auth", "add", "osd.0", "-i", str(osd_keyring), *osd_caps])
        self._run(["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
        self._spawn("osd", ["ceph-osd", "-f", "-c", conf, "-i", "0"])

        # the images pool, and Glance's user limited to it
        self.ceph(["osd", "pool", "create", IMAGES_POOL, "8", "8"])
        self._run(["rbd", "-c", str(self.conf), "--id", "admin", "pool", "init", IMAGES_POOL])
        self.create_client(GLANCE_USER, GLANCE_CAPS)
        self._wait(self.pgs_clean, timeout, "placement groups active+clean")
        self.timings["up"] = time.monotonic() - t0
        self._save_state()

    def down(self) -> None:
        """Stop the daemons by pid (OSD first) and delete the cluster's data; keep the logs."""
        state = self._load_state()
        pids = {k: int(v) for k, v in (state or {}).get("pids", self.pids).items()}
        for name in ("osd", "mgr", "mon"):
            if name in pids:
                stop_group(pids[name], 20.0, ours=lambda p: _ours(p, self.conf))
        self.pids = {}
        for sub in ("osd", "mon", "mgr", "keys", "run", "crash"):
            shutil.rmtree(self.run_dir / sub, ignore_errors=True)
        self.state_path.unlink(missing_ok=True)

    def alive(self) -> bool:
        state = self._load_state() or {}
        return any(_ours(int(p), self.conf) for p in state.get("pids", {}).values())

    @classmethod
    def load(cls, run_dir: Path) -> CephCluster:
        c = cls(run_dir)
        state = c._load_state()
        if state:
            c.fsid = state["fsid"]
            c.mon_port = int(state["mon_port"])
            c.pids = {k: int(v) for k, v in state["pids"].items()}
            c.timings = dict(state.get("timings", {}))
        return c

    def status(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"running": False, "run_dir": str(self.run_dir)}
        health = "unknown"
        if self.alive():
            try:
                health = json.loads(self.ceph(["health", "-f", "json"]))["status"]
            except (CephError, ValueError, KeyError):
                pass
        return {
            "running": self.alive(),
            "run_dir": str(self.run_dir),
            "conf": str(self.conf),
            "mon": f"v2:127.0.0.1:{self.mon_port}",
            "pids": self.pids,
            "health": health,
            "pgs": self.pg_summary() if self.alive() else {},
        }

    # ------------------------------------------------------------------ clients

    def ceph(self, args: list[str], user: str = "admin", timeout: float = 60) -> str:
        """Run the ``ceph`` tool as ``client.<user>``; returns its standard output."""
        return self._run(
            ["ceph", "-c", str(self.conf), "--id", user, "--connect-timeout", "30", *args],
            timeout=timeout,
        )

    def rbd(self, args: list[str], user: str = "admin", timeout: float = 300) -> str:
        return self._run(["rbd", "-c", str(self.conf), "--id", user, *args], timeout=timeout)

    def create_client(self, name: str, caps: tuple[str, ...]) -> Path:
        """``client.<name>`` with these caps; its key goes straight into a 0600 keyring."""
        path = self.keyring(name)
        write_private(path, b"")
        self.ceph(["auth", "get-or-create", f"client.{name}", *caps, "-o", str(path)])
        os.chmod(path, 0o600)
        return path

    def pg_summary(self) -> dict[str, int]:
        data = json.loads(self.ceph(["pg", "stat", "-f", "json"]))
        summary = data.get("pg_summary", data)
        states = {s["name"]: int(s["num"]) for s in summary.get("num_pg_by_state", [])}
        states["total"] = int(summary.get("num_pgs", 0))
        return states

    def pgs_clean(self) -> bool:
        try:
            pgs = self.pg_summary()
        except (CephError, ValueError):
            return False
        # the images pool has 8; the mgr adds its own pool once it runs
        return pgs["total"] >= 8 and pgs.get("active+clean", 0) == pgs["total"]

    # ---------------------------------------------------------------- internals

    def _run(self, args: list[str], timeout: float = 120) -> str:
        try:
            r = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CephError(f"{args[0]} {args[1:3]} timed out after {timeout:.0f}s") from None
        if r.returncode != 0:
            raise CephError(f"{args[0]} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
        return r.stdout

    def _new_key(self, keyring: Path, name: str, caps: dict[str, str]) -> None:
        """A new key made by ceph-authtool straight into a 0600 keyring file."""
        write_private(keyring, b"")
        args = ["ceph-authtool", str(keyring), "--create-keyring", "--gen-key", "-n", name]
        for kind, cap in caps.items():
            args += ["--cap", kind, cap]
        self._run(args)

    def _quiet_ok(self, args: list[str]) -> bool:
        try:
            self.ceph(args[1:], timeout=10)
        except CephError:
            return False
        return True

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.run_dir / "log" / f"{name}.out").open("ab")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.run_dir,
            start_new_session=True,
        )
        log.close()
        self.pids[name] = proc.pid
        self._save_state()

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, pid in self.pids.items():
                if not _ours(pid, self.conf):
                    raise CephError(
                        f"ceph-{name} exited while waiting for {what}: {self._tail(name)}"
                    )
            if time.monotonic() > deadline:
                raise CephError(f"Ceph: no {what} after {timeout:.0f}s")
            time.sleep(0.2)

    def _tail(self, name: str) -> str:
        out = []
        for p in sorted((self.run_dir / "log").glob(f"*{name}*")):
            out.append(p.read_text(errors="replace")[-1200:])
        return "\n".join(out)

    def _save_state(self) -> None:
        state = {
            "fsid": self.fsid,
            "mon_port": self.mon_port,
            "conf": str(self.conf),
            "pids": self.pids,
            "timings": self.timings,
        }
        self.state_path.write_text(json.dumps(state, indent=2))

    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data


# ----------------------------------------------------------------------- helpers


def _ours(pid: int, conf: Path) -> bool:
    """A live (not zombie) process started with this cluster's configuration file."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return str(conf).encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def default_run_dir() -> Path:
    return Path(os.environ.get("EDGEPIN_CP_RUN_DIR", REPO / ".run" / "controlplane")) / "ceph"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.testbed.ceph",
        description="A single-node Ceph cluster on loopback (cephx on), for the test bed.",
    )
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--run-dir", type=Path, default=default_run_dir())
    args = p.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.action == "up":
        cluster = CephCluster(run_dir)
        try:
            cluster.up()
        except CephError as e:
            print(f"ceph: {e}", file=sys.stderr)
            cluster.down()
            return 1
        print(f"ceph up in {cluster.timings['up']:.1f}s; conf {cluster.conf}")
        return 0
    cluster = CephCluster.load(run_dir)
    if args.action == "down":
        cluster.down()
        print("ceph stopped")
        return 0
    st = cluster.status()
    print(json.dumps(st, indent=2))
    return 0 if st["running"] else 3


if __name__ == "__main__":
    sys.exit(main())
