"""Child processes of the fetch benchmark; their settings (and secrets) come on stdin.

``python -m benchmarks.worker edgepin-fetch``: edgepin's own fetch (download, sha512,
signature, fsync, qemu-img check, rename) with a token and a fixed image endpoint, as the
node does after authenticating.

``python -m benchmarks.worker sdk-download``: openstacksdk's ``download_image`` to a file,
the first link of the naive chain.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _cpu_seconds() -> float:
    """CPU of this process (all its threads) and of the children it waited for (qemu-img)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def edgepin_fetch(cfg: dict[str, Any]) -> dict[str, Any]:
    from keystoneauth1 import session, token_endpoint

    from provisioner.errors import EdgepinError
    from provisioner.node import fetch
    from provisioner.node.client import NodeClient
    from provisioner.node.credentials import Identity
    from provisioner.signing import load_certificate

    sess = session.Session(
        auth=token_endpoint.Token(cfg["endpoint"], cfg["token"]), verify=cfg["ca"]
    )
    cert = load_certificate(Path(cfg["cert_pem"]).read_bytes())
    t0 = time.monotonic()
    cpu0 = _cpu_seconds()
    try:
        ident = Identity("bench", "", "", cfg["endpoint"], None, "public", Path(cfg["ca"]))
        client = NodeClient(sess, ident)
        r = fetch.fetch(client, cfg["image"], cert, Path(cfg["images_dir"]))
    except EdgepinError as e:
        return {"ok": False, "error": e.message}
    return {
        "ok": True,
        "fetch_seconds": time.monotonic() - t0,
        "fetch_cpu_seconds": _cpu_seconds() - cpu0,
        "bytes_fetched": r.bytes_fetched,
        "resumed_from": r.resumed_from,
        "restarted": r.restarted,
        "path": str(r.path),
    }


def sdk_download(cfg: dict[str, Any]) -> dict[str, Any]:
    import openstack

    conn = openstack.connect(
        auth_url=cfg["auth_url"],
        username="admin",
        password=cfg["password"],
        project_name="admin",
        user_domain_name="Default",
        project_domain_name="Default",
        cacert=cfg["ca"],
        identity_api_version="3",
        load_yaml_config=False,
        load_envvars=False,
    )
    try:
        conn.image.download_image(cfg["image_id"], output=cfg["output"])
    finally:
        conn.close()
    return {"ok": True}


def token_get(cfg: dict[str, Any]) -> dict[str, Any]:
    """The baseline: authenticate with keystoneauth and make one GET, in a fresh process."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.Password(
        auth_url=cfg["auth_url"],
        username="admin",
        password=cfg["password"],
        project_name="admin",
        user_domain_name="Default",
        project_domain_name="Default",
    )
    sess = session.Session(auth=auth, verify=cfg["ca"])
    project_id = sess.get_project_id()
    sess.get(f"{cfg['auth_url']}/projects/{project_id}").raise_for_status()
    return {"ok": True}


def main() -> int:
    cfg = json.loads(sys.stdin.read())
    handlers = {
        "edgepin-fetch": edgepin_fetch,
        "sdk-download": sdk_download,
        "token-get": token_get,
    }
    result = handlers[sys.argv[1]](cfg)
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
