"""What the checks of a node in someone's hands cost: the re-hash of the local image before
every start (against coreutils' sha512sum of the same file) and an anchored ledger save (a
TPM NV write under a PolicyPCR session on a real swtpm, against the same save without it);
and what a node process costs to start (`edgepin node reconcile` up to its first decision,
against a script that imports only keystoneauth1, libvirt and cryptography)."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.bed import MIB
from benchmarks.report import Row
from provisioner.node import config, ledger, reconcile, state
from provisioner.node.model import ImageRecord, Ledger
from tests.testbed.swtpm import SwtpmFactory

IMAGE_ID = "5e1f0c2a-7b3d-4c8e-9f10-2a3b4c5d6e7f"


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(run_dir: Path, size_mib: int, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = config.NodeConfig(root=run_dir / "node", pcrs=(7,))
    cfg.images_dir.mkdir(parents=True, exist_ok=True)
    disk = cfg.images_dir / f"{IMAGE_ID}.qcow2"
    log(f"start check: writing a {size_mib} MiB image")
    digest = hashlib.sha512()
    with disk.open("wb") as f:
        for _ in range(size_mib):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
    record = ImageRecord(digest.hexdigest(), size_mib * MIB)
    sha512sum = [
        _timed(lambda: subprocess.run(["sha512sum", str(disk)], capture_output=True, check=True))
        for _ in range(runs)
    ]
    check = [_timed(lambda: reconcile.check_local_copy(cfg, record, IMAGE_ID)) for _ in range(runs)]

    log("start check: anchored ledger saves on a swtpm")
    tpms = SwtpmFactory(run_dir / "swtpm")
    tpm = tpms.create("startcheck")
    try:
        anchor = ledger.TpmAnchor(tpm.tcti, (7,))
        anchor.define()
        enrollment = ledger.enrollment(
            {
                "node_id": "bench",
                "project_id": "p",
                "user_id": "u",
                "auth_url": "https://keystone.invalid/v3",
                "region": None,
                "interface": "public",
                "ca_sha256": "0" * 64,
                "credential_id": "c",
                "credential_sha256": "0" * 64,
                "pcrs": [7],
                "enrolled_at": "2026-12-01T00:00:00Z",
            }
        )
        saves, plain = [], []
        for gen in range(1, 4 * runs + 1):
            book2 = Ledger(enrollment, highest_generation=gen)
            saves.append(_timed(functools.partial(ledger.save, cfg.state_dir, anchor, book2)))
            plain.append(
                _timed(
                    functools.partial(
                        state.write_json, cfg.state_dir / "plain.json", ledger.as_dict(book2)
                    )
                )
            )
    finally:
        tpms.stop_all()
    disk.unlink()

    log("start check: node process start")
    edgepin = str(Path(sys.executable).parent / "edgepin")
    node_cmd = [edgepin, "node", "--root", str(run_dir / "empty"), "--tcti", "swtpm:port=1"]
    libs = "import keystoneauth1.session, keystoneauth1.identity.v3, libvirt, cryptography.x509"
    node_start, libs_start = [], []
    for _ in range(max(runs, 5)):  # interleaved
        node_start.append(
            _timed(lambda: subprocess.run([*node_cmd, "reconcile"], capture_output=True))
        )
        libs_start.append(
            _timed(lambda: subprocess.run([sys.executable, "-c", libs], capture_output=True))
        )
    return {
        "node_start_seconds": stats.median(node_start),
        "libs_start_seconds": stats.median(libs_start),
        "size_mib": size_mib,
        "sha512sum_seconds": stats.median(sha512sum),
        "check_seconds": stats.median(check),
        "anchored_save_seconds": stats.median(saves),
        "plain_save_seconds": stats.median(plain),
    }


def rows(res: dict[str, Any]) -> list[Row]:
    size = res["size_mib"]
    return [
        Row(
            f"start check, {size} MiB image",
            "re-hash before a start",
            size / res["check_seconds"],
            "MiB/s",
            "sha512sum",
            size / res["sha512sum_seconds"],
            stats.ratio(res["sha512sum_seconds"], res["check_seconds"]),
            ">= 0.8x sha512sum",
        ),
        Row(
            "anchored ledger save (swtpm)",
            "save with the TPM anchor",
            res["anchored_save_seconds"] * 1000,
            "ms",
            "plain atomic save",
            res["plain_save_seconds"] * 1000,
            stats.ratio(res["anchored_save_seconds"], res["plain_save_seconds"]),
            "only when the ledger changes",
        ),
        Row(
            "node process start",
            "edgepin node reconcile, to its first decision",
            res["node_start_seconds"] * 1000,
            "ms",
            "import keystoneauth1, libvirt, cryptography",
            res["libs_start_seconds"] * 1000,
            stats.ratio(res["node_start_seconds"], res["libs_start_seconds"]),
            "no openstacksdk",
        ),
    ]
