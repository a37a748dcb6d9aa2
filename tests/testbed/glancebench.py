"""Glance download throughput and Range behaviour of a running test-bed control plane.

Uploads one image of random bytes, downloads it whole a few times over HTTPS (streamed,
sha512 checked, as a node does), asks once for a range, deletes the image, and prints one
JSON line. Run it against a file-store and a Ceph-store control plane to compare::

    ./build.sh controlplane up --run-dir .run/cp-file
    ./build.sh controlplane up --run-dir .run/cp-ceph --store ceph
    .venv/bin/python -m tests.testbed.glancebench --run-dir .run/cp-file
    .venv/bin/python -m tests.testbed.glancebench --run-dir .run/cp-ceph
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

from tests.testbed.controlplane import ControlPlane


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.testbed.glancebench")
    p.add_argument("--run-dir", type=Path, required=True, help="a running control plane")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    cp = ControlPlane.load(args.run_dir.resolve())
    if not cp.ports:
        print(f"no control plane in {args.run_dir}", file=sys.stderr)
        return 1
    conn = cp.admin_connection()
    data = os.urandom(args.size_mib * 1024 * 1024)
    expected = hashlib.sha512(data).hexdigest()
    t0 = time.monotonic()
    image = conn.image.create_image(
        name=f"bench-{secrets.token_hex(3)}",
        disk_format="raw",
        container_format="bare",
        data=data,
        validate_checksum=False,
    )
    upload = time.monotonic() - t0
    rates = []
    try:
        for _ in range(args.runs):
            t0 = time.monotonic()
            r = conn.image.get(f"/images/{image.id}/file", stream=True)
            sha = hashlib.sha512()
            for chunk in r.iter_content(1024 * 1024):
                sha.update(chunk)
            elapsed = time.monotonic() - t0
            if sha.hexdigest() != expected:
                print("downloaded bytes differ from the upload", file=sys.stderr)
                return 1
            rates.append(len(data) / elapsed / 1e6)
        ranged = conn.image.get(
            f"/images/{image.id}/file", headers={"Range": "bytes=1024-"}, raise_exc=False
        )
        ranged.close()
    finally:
        conn.image.delete_image(image.id)
        conn.close()
    print(
        json.dumps(
            {
                "store": cp.store,
                "size_mib": args.size_mib,
                "upload_mb_s": round(len(data) / upload / 1e6, 1),
                "download_mb_s": [round(x, 1) for x in rates],
                "download_median_mb_s": round(statistics.median(rates), 1),
                "range_status": ranged.status_code,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
