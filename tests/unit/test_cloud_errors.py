"""provisioner.cloud: one-line errors from the libraries' exceptions, and a node process
that never loads openstacksdk (pure logic)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from keystoneauth1 import exceptions as ksa_exc

from provisioner.cloud import translate
from provisioner.errors import AuthError, NotFoundError, ServiceUnavailableError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _module_level_imports(module: str) -> set[str]:
    """What a module of this repository imports when it is loaded (not inside functions)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_node_modules_do_not_import_openstacksdk() -> None:
    """openstacksdk is the operator CLI's; importing it costs a node ~0.4 s per reconcile.
    Follows the node's module-level imports through this repository's modules."""
    todo = ["provisioner.node.cli", "provisioner.node.reconcile", "provisioner.node.fetch"]
    seen: set[str] = set()
    third_party: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _module_level_imports(module):
            if name.startswith("provisioner."):
                if (REPO / (name.replace(".", "/") + ".py")).exists() or (
                    REPO / name.replace(".", "/") / "__init__.py"
                ).exists():
                    todo.append(name)
            else:
                third_party.add(name.split(".")[0])
    assert "provisioner.cloud" in seen  # the walk reaches the module that used to import it
    assert "openstack" not in third_party
    assert "keystoneauth1" in third_party


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (ksa_exc.Unauthorized("no"), AuthError, "refused (401)"),
        (ksa_exc.ConnectFailure("Connection refused"), ServiceUnavailableError, "unreachable"),
        (ksa_exc.SSLError("wrong version number"), ServiceUnavailableError, "TLS failed"),
        (ksa_exc.http.NotFound(), NotFoundError, "not found"),
        (ksa_exc.http.ServiceUnavailable(), ServiceUnavailableError, "server error 503"),
    ],
)
def test_keystoneauth_errors(exc: Exception, kind: type, text: str) -> None:
    with pytest.raises(kind, match=re.escape(text)):
        with translate("glance", "download"):
            raise exc


def test_openstacksdk_errors_once_it_is_loaded() -> None:
    from openstack import exceptions as sdk_exc

    with pytest.raises(NotFoundError):
        with translate("glance"):
            raise sdk_exc.NotFoundException("gone")
    with pytest.raises(AuthError, match="401"):
        with translate("keystone"):
            raise sdk_exc.SDKException("Unauthorized (HTTP 401)")


def test_other_errors_go_through_unchanged() -> None:
    with pytest.raises(KeyError):
        with translate("glance"):
            raise KeyError("x")
