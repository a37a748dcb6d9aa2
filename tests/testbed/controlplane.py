"""The test bed's control plane: real Keystone, Glance and Barbican on loopback.

The services come from PyPI (pinned in tests/requirements/services.txt) and run in their
own venv under gunicorn, with SQLite, over HTTPS with a CA made for the run. All
files live in the run directory. A first ("cold") start provisions the databases
and saves them as a template; later starts copy the template and only rewrite the
endpoint URLs, which takes a few seconds.

Command line (used by ``./build.sh controlplane``)::

    python -m tests.testbed.controlplane up|down|status [--run-dir DIR] [--http]
                                         [--store file|ceph]

With ``--store ceph`` Glance keeps images in a real single-node Ceph cluster
(tests/testbed/ceph.py) over RBD, through a cephx user limited to the images pool. The
RBD driver needs librados' Python bindings, which only exist for the system Python, so
that tier runs the services from a second venv (``.venv-services-ceph``, made with
``--system-site-packages`` from /usr/bin/python3, same requirements).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.testbed.ceph import GLANCE_USER, IMAGES_POOL, CephCluster, CephError
from tests.testbed.process import alive, free_port, stop_group, wait_port_free, write_private

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVICES = ("keystone", "glance", "barbican")
REGION = "RegionOne"
EDGE_DOMAIN = "edge"
# Roles that edgepin relies on: nodes get member on their own project (Barbican
# needs it), operators admin; service users need service to validate tokens.
ROLES = ("admin", "member", "reader", "service")
STORES = ("file", "ceph")
# production: memcached behind Keystone's cache and Glance's and Barbican's token caches,
# four Keystone workers (docs/production.md); plain: no cache, one worker each (comparisons)
SHAPES = ("production", "plain")
WORKERS = {"production": {"keystone": 4, "glance": 1, "barbican": 1}}
# Keystone's auth middleware keeps the token it validated on itself, shared by a worker's
# threads: with more than one thread a request is authorized with another request's token
# (test_testbed_services.py::test_keystone_authorizes_each_request_with_its_own_token).
# Keystone gets one thread per worker, in every shape; the others gthread's default 8.
THREADS = {"keystone": 1}
MEMCACHED_TIMEOUT = 5  # seconds a memcached call may take before it counts as failed
MEMCACHED_DEAD_RETRY = 10  # seconds a failed memcached is left alone
# memcached's memory, sized for the fleet as docs/production.md says: a kept-token reconcile
# that misses the cache costs Keystone a token's rebuild; 64 MiB (memcached's default)
# evicted tens of thousands of entries with 10,000 nodes (docs/performance.md)
MEMCACHED_MIB = 1024
# how long Keystone takes what it cached as fresh ([cache] expiration_time and [identity]
# cache_time, both 600 s by default): longer than a node's reconcile interval plus its delay
# (1 h + 10 min by default), or every kept-token reconcile finds its token's validation,
# roles, user, project and credential expired in memcached (a get hit, yet rebuilt with
# dozens of SQL statements): docs/production.md#keystone-cache-and-token-caches
KEYSTONE_CACHE_SECONDS = 4500


class ControlPlaneError(RuntimeError):
    """The test bed could not be started or stopped."""


class ControlPlaneRunningError(ControlPlaneError):
    """up() found another control plane running in the same folder, and left it alone."""


def services_python(store: str = "file") -> Path:
    if store == "ceph":
        env = os.environ.get("EDGEPIN_SERVICES_CEPH_VENV")
        venv = Path(env) if env else REPO / ".venv-services-ceph"
    else:
        env = os.environ.get("EDGEPIN_SERVICES_VENV")
        venv = Path(env) if env else REPO / ".venv-services"
    return venv / "bin" / "python"


def template_key() -> str:
    h = hashlib.sha256()
    for path in (
        REPO / "tests" / "requirements" / "services.txt",
        Path(__file__),
        HERE / "serve.py",
    ):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def set_options(text: str, section: str, options: dict[str, str]) -> str:
    """``text``, an ini file as the test bed writes it, with ``options`` set in ``[section]``:
    a key already there gets the new value, a missing one is added at the section's end."""
    lines = text.splitlines()
    try:
        start = lines.index(f"[{section}]") + 1
    except ValueError:
        raise ControlPlaneError(f"no [{section}] section to set {sorted(options)} in") from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    todo = dict(options)
    for i in range(start, end):
        key = lines[i].split("=", 1)[0].strip()
        if "=" in lines[i] and key in todo:
            lines[i] = f"{key} = {todo.pop(key)}"
    lines[end:end] = [f"{k} = {v}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- TLS


def make_ca(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A CA for this run and one server certificate for every service."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgepin test bed CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    # the CA key is not kept: nothing else is ever signed by it
    return ca_path, cert_path, key_path


# ----------------------------------------------------------------------- configs


def _sqlite(path: Path) -> str:
    # a writer waits up to 30 s for another's lock instead of failing ("database is locked")
    return f"sqlite:///{path}?timeout=30"


def _cache(cp: ControlPlane) -> str:
    if cp.shape != "production":
        return "enabled = false\n"
    return (
        "enabled = true\n"
        "backend = oslo_cache.memcache_pool\n"
        f"memcache_servers = {cp.host}:{cp.ports['memcached']}\n"
        # one call slower than socket_timeout (1 s by default: a loaded 2-core host) marks
        # memcached dead in that worker for memcache_dead_retry (300 s), and its cache
        # invalidations are lost meanwhile
        f"socket_timeout = {MEMCACHED_TIMEOUT}\n"
        f"memcache_dead_retry = {MEMCACHED_DEAD_RETRY}\n"
        f"expiration_time = {KEYSTONE_CACHE_SECONDS}\n"
    )


def _keystone_conf(cp: ControlPlane, d: Path) -> str:
    return f"""[DEFAULT]
use_stderr = true
[database]
connection = {_sqlite(d / "keystone.db")}
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = {d}/fernet-keys
[fernet_receipts]
key_repository = {d}/fernet-keys
[credential]
key_repository = {d}/credential-keys
[identity]
password_hash_rounds = 4
cache_time = {KEYSTONE_CACHE_SECONDS}
[cache]
{_cache(cp)}[oslo_policy]
enforce_scope = false
"""


def _authtoken(cp: ControlPlane, user: str, password: str, service_type: str) -> str:
    cafile = f"cafile = {cp.ca_path}\n" if cp.tls else ""
    if cp.shape == "production":  # validated tokens cached for token_cache_time (300 s)
        cafile += (
            f"memcached_servers = {cp.host}:{cp.ports['memcached']}\n"
            f"memcache_pool_socket_timeout = {MEMCACHED_TIMEOUT}\n"
            f"memcache_pool_dead_retry = {MEMCACHED_DEAD_RETRY}\n"
        )
    return f"""[keystone_authtoken]
www_authenticate_uri = {cp.url("keystone")}
auth_url = {cp.url("keystone")}
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = {user}
password = {password}
service_type = {service_type}
region_name = {REGION}
# services reach each other by the catalog's public URLs (internal ones may be the nodes')
interface = public
{cafile}"""


def _glance_store_conf(cp: ControlPlane, d: Path) -> str:
    if cp.store == "ceph":
        # RBD through client.glance; the staging and tasks stores stay on local disk
        return f"""enabled_backends = ceph:rbd
[glance_store]
default_backend = ceph
[ceph]
store_description = Ceph RBD, pool {IMAGES_POOL}
rbd_store_pool = {IMAGES_POOL}
rbd_store_user = {GLANCE_USER}
rbd_store_ceph_conf = {cp.ceph_cluster.conf}
rbd_store_chunk_size = 8
rados_connect_timeout = 30
"""
    return f"""enabled_backends = fs:file
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {d}/images
"""


def _glance_conf(cp: ControlPlane, d: Path, password: str) -> str:
    ca = f"verify_ssl_path = {cp.ca_path}\n" if cp.tls else ""
    return f"""[DEFAULT]
use_stderr = true
worker_self_reference_url = {cp.url("glance")}
image_size_cap = 68719476736
# edgepin shares an image with each node's project; Glance's default (128 members per
# image) stops a fleet at 128 nodes per image (docs/production.md)
image_member_quota = -1
{_glance_store_conf(cp, d)}[os_glance_staging_store]
filesystem_store_datadir = {d}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {d}/tasks
[database]
connection = {_sqlite(d / "glance.db")}
[paste_deploy]
flavor = keystone
[oslo_concurrency]
lock_path = {d}/locks
[key_manager]
backend = barbican
[barbican]
auth_endpoint = {cp.url("keystone")}
barbican_endpoint_type = public
verify_ssl = {str(cp.tls).lower()}
{ca}
{_authtoken(cp, "glance", password, "image")}"""


def _barbican_conf(cp: ControlPlane, d: Path, password: str, kek: str) -> str:
    return f"""[DEFAULT]
use_stderr = true
host_href = {cp.url("barbican")}
db_auto_create = true
sql_connection = {_sqlite(d / "barbican.db")}
# a secret's read ACL lists every node sharing its image (~40 bytes each): room for 100,000
max_allowed_request_size_in_bytes = 4000000
[database]
connection = {_sqlite(d / "barbican.db")}
[secretstore]
namespace = barbican.secretstore.plugin
enabled_secretstore_plugins = store_crypto
[crypto]
namespace = barbican.crypto.plugin
enabled_crypto_plugins = simple_crypto
[simple_crypto_plugin]
kek = {kek}
{_authtoken(cp, "barbican", password, "key-manager")}"""


# -------------------------------------------------------------------- the thing


@dataclass
class ControlPlane:
    run_dir: Path
    tls: bool = True
    host: str = "127.0.0.1"
    public_host: str = "127.0.0.1"
    # the "internal" catalog interface: how QEMU-booted nodes (user networking) reach the
    # host's loopback; QEMU forwards 10.0.2.2:PORT to 127.0.0.1:PORT
    node_host: str = "10.0.2.2"
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_from: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    store: str = "file"
    # EDGEPIN_CP_SHAPE=plain runs a whole test session on the plain bed
    shape: str = field(default_factory=lambda: os.environ.get("EDGEPIN_CP_SHAPE", "production"))
    # set when up() found another control plane running here: down() then stops nothing,
    # so that a caller cleaning up after a failed up() never stops someone else's
    found_running: bool = field(default=False, repr=False)

    @property
    def python(self) -> Path:
        return services_python(self.store)

    @property
    def ceph_cluster(self) -> CephCluster:
        return CephCluster.load(self.run_dir / "ceph")

    @property
    def ca_path(self) -> Path:
        return self.run_dir / "tls" / "ca.pem"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "controlplane.json"

    @property
    def clouds_yaml(self) -> Path:
        return self.run_dir / "clouds.yaml"

    @property
    def auth_url(self) -> str:
        return self.url("keystone") + "/v3"

    def url(self, service: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.public_host}:{self.ports[service]}"

    def node_url(self, service: str) -> str:
        """The service as a node inside QEMU reaches it (the catalog's internal URL)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.node_host}:{self.ports[service]}"

    def endpoint_url(self, service: str, interface: str) -> str:
        return self.node_url(service) if interface == "internal" else self.url(service)

    def secrets(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.run_dir / "secrets.json").read_text())
        return data

    # ---------------------------------------------------------------- lifecycle

    def up(self, template_root: Path | None = None) -> None:
        t0 = time.monotonic()
        if self.state_path.exists() and self._alive():
            self.found_running = True
            raise ControlPlaneRunningError(f"control plane already running in {self.run_dir}")
        if self.store not in STORES:
            raise ControlPlaneError(f"unknown Glance store {self.store!r}: one of {STORES}")
        if not self.python.exists():
            raise ControlPlaneError(f"no services venv at {self.python.parent.parent}")
        if self.shape not in SHAPES:
            raise ControlPlaneError(f"unknown test bed shape {self.shape!r}: one of {SHAPES}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for s in SERVICES:
            self.ports[s] = free_port(self.host)
        if self.shape == "production":
            self.ports["memcached"] = free_port(self.host)
            self._save_state()  # so that down() finds memcached if what follows fails
            self._start_memcached()
        if self.store == "ceph":
            self._save_state()  # so that down() finds the cluster if its start fails
            cluster = CephCluster(self.run_dir / "ceph")
            try:
                cluster.up()
            except CephError as e:
                raise ControlPlaneError(str(e)) from None
            self.timings["ceph_up"] = cluster.timings["up"]
        hosts = list(dict.fromkeys([self.public_host, self.host, self.node_host, "localhost"]))
        make_ca(self.run_dir / "tls", hosts)
        template = (template_root / template_key()) if template_root else None
        if template and (template / "secrets.json").exists():
            self._from_template(template)
            self.started_from = "template"
        else:
            self._cold_init()
            self.started_from = "cold"
        self._tune_databases()
        self._start_all()
        if self.started_from == "cold":
            self._provision()
            if template:
                self._save_template(template)
        self._write_clouds_yaml()
        self.timings["up"] = time.monotonic() - t0
        self._save_state()

    def down(self) -> None:
        if self.found_running:
            return
        state = self._load_state()
        pids = state.get("pids", {}) if state else self.pids
        for pid in pids.values():
            _stop_pid(int(pid), self.run_dir)
        for s in SERVICES:
            if s in self.ports:
                wait_port_free(self.host, self.ports[s])
        self.pids = {}
        if (state or {}).get("store", self.store) == "ceph":
            self.ceph_cluster.down()
        if self.state_path.exists():
            self.state_path.unlink()

    def status(self) -> dict[str, Any]:
        state = self._load_state()
        if not state:
            return {"running": False, "run_dir": str(self.run_dir)}
        result: dict[str, Any] = {"running": self._alive(), "run_dir": str(self.run_dir)}
        result["services"] = {}
        for s in SERVICES:
            url = state["urls"][s]
            result["services"][s] = {
                "url": url,
                "pid": state["pids"].get(s),
                "healthy": _probe(url, self.ca_path if self.tls else None),
            }
        result["clouds_yaml"] = str(self.clouds_yaml)
        result["ca"] = str(self.ca_path) if self.tls else None
        result["store"] = state.get("store", "file")
        result["shape"] = state.get("shape", "plain")
        if result["store"] == "ceph":
            result["ceph"] = self.ceph_cluster.status()
        return result

    @classmethod
    def load(cls, run_dir: Path) -> ControlPlane:
        cp = cls(run_dir)
        state = cp._load_state()
        if state:
            cp.tls = state["tls"]
            cp.host = state["host"]
            cp.public_host = state["public_host"]
            cp.ports = {k: int(v) for k, v in state["ports"].items()}
            cp.pids = {k: int(v) for k, v in state["pids"].items()}
            cp.store = state.get("store", "file")
            cp.shape = state.get("shape", "plain")
        return cp

    def stop_service(self, name: str) -> None:
        """Stop one service (tests of an outage); start_service brings it back."""
        pid = self.pids.pop(name, None)
        if pid:
            _stop_pid(pid, self.run_dir)
            wait_port_free(self.host, self.ports[name])
        self._save_state()

    def start_service(self, name: str) -> None:
        self._start(name)
        self._wait_ready([name])
        self._save_state()

    @contextlib.contextmanager
    def reconfigured(
        self, service: str, section: str, options: dict[str, str], conf: str = ""
    ) -> Iterator[None]:
        """Restart ``service`` with ``options`` set in ``[section]`` of its configuration
        (``<service>.conf`` unless ``conf`` names another file); afterwards the file is put
        back as it was and the service restarted again, also when the block fails."""
        path = self.run_dir / service / (conf or f"{service}.conf")
        original = path.read_text()
        try:
            path.write_text(set_options(original, section, options))
            self.stop_service(service)
            self.start_service(service)
            yield
        finally:
            path.write_text(original)
            self.stop_service(service)
            self.start_service(service)

    def bulk_identities(
        self,
        records: list[dict[str, Any]],
        progress: Callable[[int], None] | None = None,
        processes: int = 2,
    ) -> list[dict[str, Any]]:
        """Create node identities straight through Keystone's managers
        (``tests/testbed/keystone_bulk.py``: the record format is there), for fleet
        benchmarks, in ``processes`` processes at once (SQLite serialises their writes,
        the rest of their work runs beside each other); the secrets go through stdin.
        ``progress`` hears the count of nodes made so far."""
        script = Path(__file__).with_name("keystone_bulk.py")
        kd = self._dir("keystone")
        conf = ["--config-file", str(kd / "keystone.conf")]
        made: list[dict[str, Any]] = []
        lock = threading.Lock()

        def run(part: list[dict[str, Any]]) -> int:
            with (kd / "bulk.log").open("ab") as log:
                proc = subprocess.Popen(
                    [str(self.python), str(script), *conf],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=kd,
                    text=True,
                )
                assert proc.stdin is not None and proc.stdout is not None

                def feed(stdin: Any) -> None:
                    with contextlib.suppress(BrokenPipeError), stdin:
                        for rec in part:
                            stdin.write(json.dumps(rec) + "\n")

                writer = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
                writer.start()
                for line in proc.stdout:
                    with lock:
                        made.append(json.loads(line))
                        if progress:
                            progress(len(made))
                writer.join()
                return proc.wait()

        parts = [records[i::processes] for i in range(processes)]
        with ThreadPoolExecutor(processes) as pool:
            codes = list(pool.map(run, parts))
        if any(codes) or len(made) != len(records):
            tail = (kd / "bulk.log").read_text(errors="replace")[-2000:]
            raise ControlPlaneError(
                f"keystone_bulk.py made {len(made)} of {len(records)} nodes (exit {codes}):\n{tail}"
            )
        return made

    # ---------------------------------------------------------------- internals

    def _dir(self, service: str) -> Path:
        d = self.run_dir / service
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _manage(self, service: str, args: list[str], env: dict[str, str] | None = None) -> None:
        bin_dir = self.python.parent
        full_env = {**os.environ, **(env or {})}
        if service == "barbican":
            full_env["HOME"] = str(self._dir("barbican"))
        log = self._dir(service) / "manage.log"
        with log.open("ab") as out:
            rc = subprocess.run(
                [str(bin_dir / f"{service}-manage"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self._dir(service),
                check=False,
            ).returncode
        if rc != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise ControlPlaneError(f"{service}-manage {args[0]} failed (exit {rc}):\n{tail}")

    def _write_configs(self, sec: dict[str, str]) -> None:
        kd = self._dir("keystone")
        (kd / "keystone.conf").write_text(_keystone_conf(self, kd))
        gd = self._dir("glance")
        for sub in ("images", "staging", "tasks", "locks"):
            (gd / sub).mkdir(exist_ok=True)
        write_private(gd / "glance-api.conf", _glance_conf(self, gd, sec["glance_password"]))
        venv_etc = self.python.parent.parent / "etc"
        shutil.copy(venv_etc / "glance" / "glance-api-paste.ini", gd / "glance-api-paste.ini")
        bd = self._dir("barbican")
        conf_dir = bd / ".barbican"
        conf_dir.mkdir(exist_ok=True)
        write_private(
            conf_dir / "barbican.conf",
            _barbican_conf(self, bd, sec["barbican_password"], sec["barbican_kek"]),
        )
        shutil.copy(
            venv_etc / "barbican" / "barbican-api-paste.ini", conf_dir / "barbican-api-paste.ini"
        )

    def _cold_init(self) -> None:
        t0 = time.monotonic()
        sec = {
            "admin_password": secrets.token_urlsafe(24),
            "glance_password": secrets.token_urlsafe(24),
            "barbican_password": secrets.token_urlsafe(24),
            "barbican_kek": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        write_private(self.run_dir / "secrets.json", json.dumps(sec))
        self._write_configs(sec)
        kconf = ["--config-file", str(self._dir("keystone") / "keystone.conf")]
        self._manage("keystone", [*kconf, "db_sync"])
        for what in ("fernet_setup", "credential_setup"):
            self._manage(
                "keystone", [*kconf, what, "--keystone-user", "root", "--keystone-group", "root"]
            )
        ks = self.url("keystone")
        self._manage(
            "keystone",
            [
                *kconf,
                "bootstrap",
                "--bootstrap-username",
                "admin",
                "--bootstrap-project-name",
                "admin",
                "--bootstrap-role-name",
                "admin",
                "--bootstrap-service-name",
                "keystone",
                "--bootstrap-region-id",
                REGION,
                "--bootstrap-admin-url",
                ks,
                "--bootstrap-public-url",
                ks,
                "--bootstrap-internal-url",
                self.node_url("keystone"),
            ],
            # the password goes through the environment, never the command line
            env={"OS_BOOTSTRAP_PASSWORD": sec["admin_password"]},
        )
        gconf = ["--config-file", str(self._dir("glance") / "glance-api.conf")]
        self._manage("glance", [*gconf, "db_sync"])
        self._manage("barbican", ["db", "upgrade"])
        self.timings["db_init"] = time.monotonic() - t0

    def _save_template(self, template: Path) -> None:
        tmp = template.with_name(template.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for service, db in (
            ("keystone", "keystone.db"),
            ("glance", "glance.db"),
            ("barbican", "barbican.db"),
        ):
            src = sqlite3.connect(self._dir(service) / db)
            dst = sqlite3.connect(tmp / db)
            with dst:
                src.backup(dst)
            src.close()
            dst.close()
        kd = self._dir("keystone")
        shutil.copytree(kd / "fernet-keys", tmp / "fernet-keys")
        shutil.copytree(kd / "credential-keys", tmp / "credential-keys")
        shutil.copy(self.run_dir / "secrets.json", tmp / "secrets.json")
        (tmp / "endpoints.json").write_text(
            json.dumps(
                {
                    i: {s: self.endpoint_url(s, i) for s in SERVICES}
                    for i in ("public", "internal", "admin")
                }
            )
        )
        try:
            tmp.rename(template)
        except OSError:  # another run saved it first
            shutil.rmtree(tmp, ignore_errors=True)

    def _from_template(self, template: Path) -> None:
        t0 = time.monotonic()
        shutil.copy(template / "secrets.json", self.run_dir / "secrets.json")
        os.chmod(self.run_dir / "secrets.json", 0o600)
        sec = self.secrets()
        self._write_configs(sec)
        kd = self._dir("keystone")
        for db, service in (
            ("keystone.db", "keystone"),
            ("glance.db", "glance"),
            ("barbican.db", "barbican"),
        ):
            shutil.copy(template / db, self._dir(service) / db)
        for keys in ("fernet-keys", "credential-keys"):
            shutil.copytree(template / keys, kd / keys, dirs_exist_ok=True)
            for p in (kd / keys).iterdir():
                os.chmod(p, 0o600)
        # point the catalog at this run's ports
        old = json.loads((template / "endpoints.json").read_text())
        conn = sqlite3.connect(kd / "keystone.db")
        with conn:
            for i, urls in old.items():
                for s in SERVICES:
                    conn.execute(
                        "UPDATE endpoint SET url = replace(url, ?, ?) WHERE interface = ?",
                        (urls[s], self.endpoint_url(s, i), i),
                    )
        conn.close()
        self.timings["template_copy"] = time.monotonic() - t0

    def _start(self, service: str) -> None:
        d = self._dir(service)
        cfg = d  # barbican: HOME, with .barbican/ inside
        bind = f"{self.host}:{self.ports[service]}"
        tls_dir = self.run_dir / "tls"
        cert = str(tls_dir / "server.pem") if self.tls else "-"
        key = str(tls_dir / "server-key.pem") if self.tls else "-"
        log = (d / "server.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        workers = WORKERS.get(self.shape, {}).get(service)
        if workers and "EDGEPIN_CP_WORKERS" not in os.environ:
            env["EDGEPIN_CP_WORKERS"] = str(workers)
        threads = THREADS.get(service)
        if threads and "EDGEPIN_CP_THREADS" not in os.environ:
            env["EDGEPIN_CP_THREADS"] = str(threads)
        proc = subprocess.Popen(
            [str(self.python), str(HERE / "serve.py"), service, str(cfg), bind, cert, key],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=d,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.pids[service] = proc.pid

    def _start_memcached(self) -> None:
        """memcached on loopback for Keystone's cache and the services' token caches."""
        binary = shutil.which("memcached") or "/usr/bin/memcached"
        if not Path(binary).exists():
            raise ControlPlaneError("memcached is missing: ./build.sh setup installs it")
        d = self._dir("memcached")
        port = self.ports["memcached"]
        argv = [binary, "-l", self.host, "-p", str(port), "-U", "0", "-m", str(MEMCACHED_MIB)]
        argv += ["-c", "4096"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # memcached refuses to run as root
        with (d / "memcached.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=d,
                start_new_session=True,
            )
        self.pids["memcached"] = proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((self.host, port), timeout=2) as c:
                    c.sendall(b"version\r\n")
                    if c.recv(64).startswith(b"VERSION"):
                        return
            except OSError:
                pass
            if not alive(proc.pid) or time.monotonic() > deadline:
                tail = (d / "memcached.log").read_text(errors="replace")[-1000:]
                raise ControlPlaneError(f"memcached did not start:\n{tail}")
            time.sleep(0.1)

    def memcached_stats(self) -> dict[str, int]:
        """memcached's counters (``get_hits``, ``curr_items``, ...), for tests and benchmarks."""
        with socket.create_connection((self.host, self.ports["memcached"]), timeout=5) as c:
            c.sendall(b"stats\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        stats: dict[str, int] = {}
        for line in data.decode().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
                stats[parts[1]] = int(parts[2])
        return stats

    def _tune_databases(self) -> None:
        """Write-ahead logging: readers do not block a writer, nor a writer the readers
        (several workers and threads share each SQLite file)."""
        for service in SERVICES:
            db = sqlite3.connect(self._dir(service) / f"{service}.db")
            try:
                db.execute("PRAGMA journal_mode=WAL")
            finally:
                db.close()

    def _start_all(self) -> None:
        t0 = time.monotonic()
        for s in SERVICES:
            self._start(s)
        self._wait_ready(list(SERVICES))
        self.timings["services_ready"] = time.monotonic() - t0

    def _wait_ready(self, services: list[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            for s in list(pending):
                pid = self.pids[s]
                if not alive(pid):
                    log = self._dir(s) / "server.log"
                    err = self._dir(s) / "error.log"
                    tail = ""
                    for p in (log, err):
                        if p.exists():
                            tail += p.read_text(errors="replace")[-1500:]
                    raise ControlPlaneError(f"{s} exited during start:\n{tail}")
                if _probe(self.url(s), self.ca_path if self.tls else None):
                    pending.remove(s)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"services not ready after {timeout:.0f}s: {pending}")
            if pending:
                time.sleep(0.2)

    def admin_connection(self) -> Any:
        import openstack

        return openstack.connect(
            auth_url=self.auth_url,
            username="admin",
            password=self.secrets()["admin_password"],
            project_name="admin",
            user_domain_name="Default",
            project_domain_name="Default",
            region_name=REGION,
            cacert=str(self.ca_path) if self.tls else None,
            identity_api_version="3",
            load_yaml_config=False,
            load_envvars=False,
        )

    def _provision(self) -> None:
        t0 = time.monotonic()
        sec = self.secrets()
        conn = self.admin_connection()
        ident = conn.identity
        roles = {r.name: r for r in ident.roles()}
        for name in ROLES:
            if name not in roles:
                roles[name] = ident.create_role(name=name)
        service_project = ident.create_project(name="service", domain_id="default")
        for user, stype, service in (
            ("glance", "image", "glance"),
            ("barbican", "key-manager", "barbican"),
        ):
            u = ident.create_user(
                name=user,
                password=sec[f"{user}_password"],
                domain_id="default",
                default_project_id=service_project.id,
            )
            for role in ("admin", "service"):
                ident.assign_project_role_to_user(service_project, u, roles[role])
            svc = ident.create_service(name=service, type=stype, is_enabled=True)
            for interface in ("public", "internal", "admin"):
                ident.create_endpoint(
                    service_id=svc.id,
                    interface=interface,
                    url=self.endpoint_url(service, interface),
                    region_id=REGION,
                )
        ident.create_domain(name=EDGE_DOMAIN, description="edgepin nodes: one project per node")
        conn.close()
        self.timings["provision"] = time.monotonic() - t0

    def _write_clouds_yaml(self) -> None:
        sec = self.secrets()
        cacert = f"    cacert: {self.ca_path}\n" if self.tls else ""
        write_private(
            self.clouds_yaml,
            f"""clouds:
  edgepin-testbed:
    auth:
      auth_url: {self.auth_url}
      username: admin
      password: {sec["admin_password"]}
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: {REGION}
    identity_api_version: 3
{cacert}""",
        )

    def _save_state(self) -> None:
        state = {
            "tls": self.tls,
            "host": self.host,
            "public_host": self.public_host,
            "ports": self.ports,
            "pids": self.pids,
            "urls": {s: self.url(s) for s in SERVICES},
            "auth_url": self.auth_url,
            "started_from": self.started_from,
            "timings": self.timings,
            "store": self.store,
            "shape": self.shape,
        }
        self.state_path.write_text(json.dumps(state, indent=2))

    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data

    def _alive(self) -> bool:
        state = self._load_state()
        return bool(state) and any(alive(int(p)) for p in (state or {}).get("pids", {}).values())


# ----------------------------------------------------------------------- helpers


def _ours(run_dir: Path) -> Callable[[int], bool]:
    """Whether a pid is one of this run's services. gunicorn rewrites its title (and the
    memory of argv and environ); the working directory, the service's folder in the run
    directory, tells that it is ours."""

    def check(pid: int) -> bool:
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return False
        return cwd.startswith(str(run_dir))  # else the pid was reused by something else

    return check


def _stop_pid(pid: int, run_dir: Path) -> None:
    """Stop a service's process group, but only if it is really ours."""
    stop_group(pid, 15.0, ours=_ours(run_dir))


def _probe(url: str, ca: Path | None) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url + "/", timeout=2, context=ctx) as r:  # noqa: S310
            return int(r.status) < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- CLI


def default_run_dir() -> Path:
    return Path(os.environ.get("EDGEPIN_CP_RUN_DIR", REPO / ".run" / "controlplane"))


def default_template_root() -> Path:
    return Path(os.environ.get("EDGEPIN_CACHE_DIR", REPO / ".cache")) / "controlplane-template"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="./build.sh controlplane",
        description="Run the test bed's Keystone, Glance and Barbican by hand, on loopback.",
    )
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--run-dir", type=Path, default=default_run_dir(), help="run directory")
    p.add_argument("--http", action="store_true", help="plain HTTP instead of HTTPS")
    p.add_argument(
        "--public-host",
        default=os.environ.get("EDGEPIN_CP_PUBLIC_HOST", "127.0.0.1"),
        help="address written into the catalog and the certificate (default 127.0.0.1)",
    )
    p.add_argument("--no-template", action="store_true", help="always provision from scratch")
    p.add_argument(
        "--plain",
        action="store_true",
        help="no memcached, Keystone's cache off, one worker per service (for comparisons); "
        "by default the bed is shaped as docs/production.md says: memcached behind Keystone's "
        "cache and the services' token caches, four Keystone workers",
    )
    p.add_argument(
        "--store",
        choices=STORES,
        default="file",
        help="Glance's image store: file (default) or ceph (a single-node Ceph cluster, RBD)",
    )
    args = p.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.action == "up":
        cp = ControlPlane(
            run_dir,
            tls=not args.http,
            public_host=args.public_host,
            store=args.store,
            shape="plain" if args.plain else "production",
        )
        try:
            cp.up(None if args.no_template else default_template_root())
        except ControlPlaneError as e:
            print(f"controlplane: {e}", file=sys.stderr)
            cp.down()
            return 1
        except BaseException:
            cp.down()  # leave nothing running (Ceph included), then show what happened
            raise
        print(f"control plane up ({cp.shape}, {cp.started_from} start, {cp.timings['up']:.1f}s)")
        if cp.shape == "production":
            print(f"  memcached {cp.host}:{cp.ports['memcached']}")
        if cp.store == "ceph":
            print(
                f"  ceph      {cp.ceph_cluster.conf} (pool {IMAGES_POOL}, "
                f"user client.{GLANCE_USER}; up in {cp.timings['ceph_up']:.1f}s)"
            )
        for s in SERVICES:
            print(f"  {s:9} {cp.url(s)}")
        print(f"  clouds.yaml  {cp.clouds_yaml}  (cloud name: edgepin-testbed)")
        if cp.tls:
            print(f"  CA           {cp.ca_path}")
        print(f"use: export OS_CLIENT_CONFIG_FILE={cp.clouds_yaml} OS_CLOUD=edgepin-testbed")
        return 0
    cp = ControlPlane.load(run_dir)
    if args.action == "down":
        cp.down()
        print("control plane stopped")
        return 0
    st = cp.status()
    print(json.dumps(st, indent=2))
    return 0 if st["running"] else 3


if __name__ == "__main__":
    sys.exit(main())
