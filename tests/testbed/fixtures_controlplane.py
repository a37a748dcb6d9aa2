"""Fixtures for the control-plane part of the test bed: Keystone, Glance, Barbican."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openstack
import pytest

from tests.testbed.ceph import missing_binaries
from tests.testbed.controlplane import (
    REGION,
    ControlPlane,
    default_template_root,
    services_python,
)
from tests.testbed.process import group_alive


@dataclass
class TestUser:
    """A user with member on its own project (in the edge domain unless told otherwise)."""

    __test__ = False
    project_id: str
    user_id: str
    name: str
    password: str
    domain_id: str

    def connection(self, cp: ControlPlane) -> Any:
        return openstack.connect(
            auth_url=cp.auth_url,
            username=self.name,
            password=self.password,
            user_domain_id=self.domain_id,
            project_id=self.project_id,
            region_name=REGION,
            cacert=str(cp.ca_path) if cp.tls else None,
            identity_api_version="3",
            load_yaml_config=False,
            load_envvars=False,
        )


@pytest.fixture(scope="session")
def controlplane(run_dir: Path, cache_dir: Path) -> Iterator[ControlPlane]:
    """Keystone, Glance and Barbican for the whole session, over HTTPS on loopback."""
    cp = ControlPlane(run_dir / "controlplane")
    try:
        cp.up(default_template_root() if cache_dir else None)
    except Exception:
        cp.down()
        raise
    yield cp
    pids = dict(cp.pids)
    cp.down()
    leftover = [name for name, pid in pids.items() if group_alive(pid)]
    assert not leftover, f"control-plane processes left behind: {leftover}"


@pytest.fixture(scope="module")
def ceph_controlplane(run_dir: Path, cache_dir: Path) -> Iterator[ControlPlane]:
    """The same services with Glance on a real single-node Ceph (RBD): the ``ceph`` tier.

    Module-scoped: the cluster (~400 MB, a mgr that ticks) is gone once its tests are done.
    """
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Ceph is not installed ({', '.join(missing)}): run ./build.sh setup")
    if not services_python("ceph").exists():
        pytest.skip("no services venv for the Ceph tier (.venv-services-ceph): ./build.sh setup")
    cp = ControlPlane(run_dir / "controlplane-ceph", store="ceph")
    try:
        cp.up(default_template_root() if cache_dir else None)
    except Exception:
        cp.down()
        raise
    yield cp
    pids = dict(cp.pids)
    ceph_pids = dict(cp.ceph_cluster.pids)
    cp.down()
    leftover = [name for name, pid in {**pids, **ceph_pids}.items() if group_alive(pid)]
    assert not leftover, f"control-plane or Ceph processes left behind: {leftover}"


@pytest.fixture(scope="session")
def admin(controlplane: ControlPlane) -> Iterator[Any]:
    conn = controlplane.admin_connection()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def make_user(controlplane: ControlPlane, admin: Any) -> Callable[[str], TestUser]:
    """Create a project + user with member (the role Barbican needs) in the edge domain."""
    domain = admin.identity.find_domain("edge", ignore_missing=False)
    member = admin.identity.find_role("member", ignore_missing=False)

    def make(prefix: str) -> TestUser:
        name = f"{prefix}-{secrets.token_hex(4)}"
        project = admin.identity.create_project(name=name, domain_id=domain.id)
        password = secrets.token_urlsafe(18)
        user = admin.identity.create_user(
            name=name, password=password, domain_id=domain.id, default_project_id=project.id
        )
        admin.identity.assign_project_role_to_user(project, user, member)
        return TestUser(project.id, user.id, name, password, domain.id)

    return make
