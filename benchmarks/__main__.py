"""``python -m benchmarks [--large] [--fleet N] [--only SECTION ...]``."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import fetchbench, footprint, report
from benchmarks.bed import MIB, Bed
from benchmarks.report import Row

SECTIONS = ("fetch", "resume", "reconcile", "fleet", "footprint")
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--runs", type=int, default=3, help="runs per fetch method (median; default 3)")
    p.add_argument("--size-mib", type=int, default=256, help="fetch image size (default 256)")
    p.add_argument("--large", action="store_true", help="also fetch a 2 GiB image (slow)")
    p.add_argument("--fleet", type=int, default=100, help="simulated nodes (default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="fleet: nodes at once (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="fleet: reconciles per node (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--run-dir", type=Path, help="run directory (default: a new temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON directory")
    return p.parse_args(argv)


def fetch_rows(label: str, res: dict[str, Any]) -> list[Row]:
    m = res["methods"]
    rows = []
    for name in ("curl", "edgepin", "naive"):
        goal = ">= 0.9x curl" if name == "edgepin" else ""
        rows.append(
            Row(
                f"fetch {label}",
                f"{name} throughput",
                m[name]["mib_per_s"],
                "MiB/s",
                "curl",
                m["curl"]["mib_per_s"],
                m[name]["throughput_vs_curl"],
                goal,
            )
        )
    for name in ("curl", "edgepin", "naive"):
        rows.append(
            Row(
                f"fetch {label}",
                f"{name} peak RSS",
                m[name]["peak_rss_mib"],
                "MiB",
                "curl",
                m["curl"]["peak_rss_mib"],
                m[name]["peak_rss_vs_curl"],
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    only = set(args.only or SECTIONS)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="edgepin-bench-", dir="/var/tmp"))
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "command": " ".join(["./build.sh bench", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    bed: Bed | None = None
    try:
        if only & {"fetch", "resume", "reconcile", "fleet"}:
            log(f"starting the control plane in {run_dir}")
            bed = Bed(run_dir)
            bed.up()
        image = None
        if bed and only & {"fetch", "resume"}:
            sizes = [args.size_mib * MIB] + ([2048 * MIB] if args.large else [])
            for size in sizes:
                label = f"{size // MIB} MiB"
                res = fetchbench.bench_fetch(bed, size, args.runs if "fetch" in only else 0, log)
                raw[f"fetch_{size // MIB}m"] = res
                if "fetch" in only:
                    rows += fetch_rows(label, res)
                image = image or res["image"]
        if bed and image and "resume" in only:
            res = fetchbench.bench_resume(bed, image, log)
            raw["resume"] = res
            rows.append(
                Row(
                    "resume",
                    "bytes transferred / image size",
                    res["transferred_bytes"] / MIB,
                    "MiB",
                    "image size",
                    res["image_bytes"] / MIB,
                    res["transferred_vs_size"],
                    "<= 1.05",
                )
            )
        if "footprint" in only:
            fp = footprint.measure(Path(__file__).resolve().parent.parent / "out")
            raw["footprint"] = fp
            rows += footprint.rows(fp)
    finally:
        meta["loadavg_end"] = os.getloadavg()
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if bed is not None:
            log("stopping the control plane")
            bed.down()
        if not args.keep and args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    report.print_table(rows)
    path = report.write_json(args.out, meta, rows, raw)
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
