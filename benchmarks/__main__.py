"""``python -m benchmarks [--large] [--fleet N [N ...]] [--only SECTION ...]``."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    fetchbench,
    fleet,
    footprint,
    nodebench,
    placebench,
    report,
    rootread,
    startcheck,
    stats,
)
from benchmarks.bed import MIB, Bed, BenchError
from benchmarks.report import Row
from tests.testbed import ceph

SECTIONS = (
    "fetch",
    "resume",
    "reconcile",
    "fleet",
    "placement",
    "startcheck",
    "footprint",
    "rootread",
)
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--runs", type=int, default=3, help="runs per fetch method (median; default 3)")
    p.add_argument("--size-mib", type=int, default=256, help="fetch image size (default 256)")
    p.add_argument("--large", action="store_true", help="also fetch a 2 GiB image (slow)")
    p.add_argument(
        "--link-mibps",
        type=float,
        default=20,
        help="fetch also through a proxy throttled to this rate, MiB/s (0: skip; default 20)",
    )
    p.add_argument(
        "--fleet",
        type=int,
        nargs="+",
        default=[100],
        metavar="N",
        help="simulated nodes; several sizes grow one fleet, e.g. --fleet 100 1000 "
        "(default 100). Every size runs the baseline, no-change (a new token) and "
        "kept-token rounds; the metadata and Keystone-cache rounds run at the smallest "
        "size, and only its nodes get the image shared",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="fleet: nodes at once, in the rounds and while enrolling them (default 8)",
    )
    p.add_argument(
        "--placement-nodes",
        type=int,
        default=1000,
        metavar="N",
        help="placement: nodes that edgepin plan and apply place (default 1000); "
        "apply runs --concurrency assignments at a time",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fleet: reconciles per node at the smallest size (default 3; bigger sizes: 1)",
    )
    p.add_argument(
        "--keystone-cache",
        action="store_true",
        help="fleet: also run with Keystone's cache on (in-process backend; see docs)",
    )
    p.add_argument(
        "--no-ceph",
        dest="ceph",
        action="store_false",
        help="fetch and resume on the file store only (default: also on a single-node Ceph)",
    )
    p.add_argument(
        "--shape",
        choices=("plain", "production"),
        default="plain",
        help="the test bed's shape: plain (no memcached, Keystone's cache off, one worker; "
        "default) or production (memcached, caches on, as docs/production.md says)",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--run-dir", type=Path, help="run directory (default: a new temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON directory")
    return p.parse_args(argv)


def fetch_rows(label: str, res: dict[str, Any]) -> list[Row]:
    m = res["methods"]
    rows = []
    for name in ("curl", "edgepin", "naive"):
        goal = ">= 0.8x curl at 1 GiB" if name == "edgepin" else ""
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
    e = m["edgepin"]
    if "throughput_vs_curl_sha512" in e:
        least = m["curl_sha512"]["mib_per_s"]
        rows.append(
            Row(
                f"fetch {label}",
                "curl | openssl dgst -sha512 throughput (the least a verified download does)",
                least,
                "MiB/s",
                "curl",
                m["curl"]["mib_per_s"],
                m["curl_sha512"]["throughput_vs_curl"],
            )
        )
        rows.append(
            Row(
                f"fetch {label}",
                "edgepin throughput against the least a verified download does",
                e["mib_per_s"],
                "MiB/s",
                "curl | openssl",
                least,
                e["throughput_vs_curl_sha512"],
            )
        )
    if res.get("sha512_one_core_mib_per_s"):
        rows.append(
            Row(
                f"fetch {label}",
                "SHA-512 on one core (hashlib; no verified download is faster)",
                res["sha512_one_core_mib_per_s"],
                "MiB/s",
                "curl",
                m["curl"]["mib_per_s"],
                stats.ratio(res["sha512_one_core_mib_per_s"], m["curl"]["mib_per_s"]),
            )
        )
    if "in_process_mib_per_s" in e:
        rows.append(
            Row(
                f"fetch {label}",
                "edgepin throughput, fetch() alone (no process start)",
                e["in_process_mib_per_s"],
                "MiB/s",
                "curl",
                m["curl"]["mib_per_s"],
                e["in_process_vs_curl"],
            )
        )
    if "cpu_seconds_per_gib" in e:
        base = m["curl_sha512"]["cpu_seconds_per_gib"]
        for key, what, goal in (
            ("cpu", "edgepin CPU per GiB (its process)", "<= 1.3x"),
            ("fetch_cpu", "edgepin CPU per GiB, fetch() alone (no process start)", ""),
        ):
            rows.append(
                Row(
                    f"fetch {label}",
                    what,
                    e[f"{key}_seconds_per_gib"],
                    "s",
                    "curl | openssl dgst -sha512",
                    base,
                    e[f"{key}_vs_curl_sha512"],
                    goal,
                )
            )
    if "glance_cpu_seconds_per_gib" in e:
        # CPU-seconds Glance spends per GiB, against curl's wall seconds per GiB
        curl_s_per_gib = m["curl"]["seconds_median"] * 1024 * MIB / res["image_bytes"]
        rows.append(
            Row(
                f"fetch {label}",
                "glance CPU per GiB served (edgepin runs)",
                e["glance_cpu_seconds_per_gib"],
                "s",
                "curl s/GiB",
                curl_s_per_gib,
                stats.ratio(e["glance_cpu_seconds_per_gib"], curl_s_per_gib),
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


def node_rows(res: dict[str, Any]) -> list[Row]:
    sec = "reconcile, no change"
    base = "auth + 1 GET"
    b = res["baseline_seconds_median"]
    return [
        Row(
            sec,
            "wall time (edgepin node reconcile)",
            res["nochange_seconds_median"],
            "s",
            base,
            b,
            res["nochange_vs_baseline"],
        ),
        Row(
            sec,
            "HTTP requests at proxies",
            res["requests_total_median"],
            "",
            base,
            2.0,
            stats.ratio(res["requests_total_median"], 2.0),
        ),
        Row(
            sec,
            "tokens issued",
            res["tokens_issued_median"],
            "",
            base,
            1.0,
            stats.ratio(res["tokens_issued_median"], 1.0),
        ),
        Row(
            "reconcile, offline",
            "reconcile wall time (guest started, 5 s settle)",
            res["offline_reconcile_seconds"],
            "s",
            base,
            b,
            res["offline_vs_baseline"],
        ),
        Row(
            "reconcile, offline",
            "start to guest marker on serial",
            res["offline_to_guest_marker_seconds"],
            "s",
            base,
            b,
            stats.ratio(res["offline_to_guest_marker_seconds"], b)
            if res["offline_to_guest_marker_seconds"]
            else None,
        ),
    ]


def fleet_rows(res: dict[str, Any]) -> list[Row]:
    sec = f"fleet N={res['nodes']}"
    b = res["baseline"]
    base = "bare GET /v3"

    def r(metric: str, value: float, unit: str, bval: float, goal: str = "") -> Row:
        return Row(sec, metric, value, unit, base, bval, stats.ratio(value, bval), goal)

    bcpu = b["cpu_seconds_per_reconcile"]["keystone"] * 1000
    rows: list[Row] = []
    for key, label, goal in (
        ("kept_token", "no change, kept token (what a node does)", ">= 50/s"),
        ("nochange", "no change, issuing a token", ""),
    ):
        m = res[key]
        rows += [
            r(f"{label}: reconciles/s", m["per_second"], "/s", b["per_second"], goal),
            r(f"{label}: p50 latency", m["p50"] * 1000, "ms", b["p50"] * 1000),
            r(f"{label}: p99 latency", m["p99"] * 1000, "ms", b["p99"] * 1000),
            r(f"{label}: failed reconciles", m["errors"], "", 0.0, "0"),
        ]
        for s in ("keystone", "glance", "barbican"):
            rows.append(
                r(
                    f"{label}: requests/node {s}",
                    m["requests_per_node"][s],
                    "",
                    b["requests_per_node"]["keystone"],
                )
            )
        tokens = m["requests_per_node"]["tokens_issued"]
        rows.append(r(f"{label}: tokens issued/reconcile", tokens, "", 1.0))
        for s in ("keystone", "glance", "barbican"):
            cpu = m["cpu_seconds_per_reconcile"][s] * 1000
            rows.append(r(f"{label}: CPU ms/reconcile {s}", cpu, "ms", bcpu))
        rows.append(
            r(
                f"{label}: client CPU ms/reconcile",
                m["client_cpu_seconds_per_reconcile"] * 1000,
                "ms",
                b["client_cpu_seconds_per_reconcile"] * 1000,
            )
        )
        if m.get("memcached"):
            mc = m["memcached"]
            gets = mc["get_hits"] + mc["get_misses"]
            hits = 100.0 * mc["get_hits"] / gets if gets else None
            rows.append(Row(sec, f"{label}: memcached gets that hit", hits, "%"))
            rows.append(Row(sec, f"{label}: memcached evictions", mc["evictions"], ""))
            if mc.get("limit_maxbytes"):
                held, limit = mc["bytes"] / MIB, mc["limit_maxbytes"] / MIB
                rows.append(
                    Row(
                        sec,
                        f"{label}: memcached held after the round ({mc['curr_items']} items)",
                        held,
                        "MiB",
                        "its size",
                        limit,
                        stats.ratio(held, limit),
                    )
                )
    if "setup_seconds" in res:
        rows.append(
            Row(
                sec,
                f"set-up: {res['setup_nodes']} nodes enrolled (Keystone's managers)",
                res["setup_seconds"],
                "s",
            )
        )
    for key, label in (
        ("keystone_cache_nochange", "keystone cache on"),
        ("keystone_cache_kept_token", "keystone cache on + kept token"),
    ):
        if key not in res:
            continue
        c = res[key]
        rows.append(r(f"{label}: reconciles/s", c["per_second"], "/s", b["per_second"]))
        rows.append(r(f"{label}: failed reconciles", c["errors"], "", 0.0))
        if c["p50"] is not None:
            rows.append(r(f"{label}: p50 latency", c["p50"] * 1000, "ms", b["p50"] * 1000))
        rows.append(
            r(
                f"{label}: CPU ms/reconcile keystone",
                c["cpu_seconds_per_reconcile"]["keystone"] * 1000,
                "ms",
                bcpu,
            )
        )
    if "metadata" not in res:
        return rows
    md = res["metadata"]
    rows.append(r("with image metadata: reconciles/s", md["per_second"], "/s", b["per_second"]))
    for s in ("keystone", "glance"):
        rows.append(
            r(
                f"with image metadata: requests/node {s}",
                md["requests_per_node"][s],
                "",
                b["requests_per_node"]["keystone"],
            )
        )
        rows.append(
            r(
                f"with image metadata: CPU ms/reconcile {s}",
                md["cpu_seconds_per_reconcile"][s] * 1000,
                "ms",
                bcpu,
            )
        )
    return rows


def resume_row(section: str, res: dict[str, Any]) -> Row:
    return Row(
        section,
        "bytes transferred / image size"
        + (" (store refused the range: from byte 0)" if res["restarted_from_zero"] else ""),
        res["transferred_bytes"] / MIB,
        "MiB",
        "image size",
        res["image_bytes"] / MIB,
        res["transferred_vs_size"],
        "<= 1.05" if not res["restarted_from_zero"] else "converges, no loop",
    )


def ceph_sections(
    args: argparse.Namespace, only: set[str], run_dir: Path, raw: dict[str, Any]
) -> list[Row]:
    """Fetch and resume again with Glance on a real single-node Ceph (RBD), issue 10.

    Same image size and methods as on the file store; RBD answers a Range request with
    400, so the resume row shows what the node does then (one restart from byte 0).
    """
    missing = ceph.missing_binaries()
    if missing:
        raise BenchError(
            f"Ceph is not installed ({', '.join(missing)}): run ./build.sh setup, "
            "or pass --no-ceph to measure the file store only"
        )
    rows: list[Row] = []
    log(f"starting a control plane with Glance on Ceph (RBD) in {run_dir}")
    bed = Bed(run_dir, store="ceph")
    t0 = time.monotonic()
    bed.up()
    raw["ceph_up_seconds"] = time.monotonic() - t0
    raw["ceph_cluster_up_seconds"] = bed.cp.timings.get("ceph_up")
    if raw.get("controlplane_up_seconds"):
        rows.append(
            Row(
                "Glance on Ceph",
                f"control plane up, Ceph cluster included ({raw['ceph_cluster_up_seconds']:.1f} s)",
                raw["ceph_up_seconds"],
                "s",
                "file store",
                raw["controlplane_up_seconds"],
                stats.ratio(raw["ceph_up_seconds"], raw["controlplane_up_seconds"]),
            )
        )
    try:
        size = args.size_mib * MIB
        runs = args.runs if "fetch" in only else 0
        res = fetchbench.bench_fetch(bed, size, runs, log)
        raw[f"ceph_fetch_{size // MIB}m"] = res
        if "fetch" in only:
            rows += fetch_rows(f"{size // MIB} MiB, Glance on Ceph", res)
            file_res = raw.get(f"fetch_{size // MIB}m")
            if file_res and file_res["methods"]["edgepin"].get("mib_per_s"):
                for name in ("curl", "edgepin"):
                    rows.append(
                        Row(
                            f"fetch {size // MIB} MiB, Glance on Ceph",
                            f"{name} on Ceph against {name} on the file store",
                            res["methods"][name]["mib_per_s"],
                            "MiB/s",
                            "file store",
                            file_res["methods"][name]["mib_per_s"],
                            stats.ratio(
                                res["methods"][name]["mib_per_s"],
                                file_res["methods"][name]["mib_per_s"],
                            ),
                        )
                    )
        if "resume" in only:
            r = fetchbench.bench_resume(bed, res["image"], log)
            raw["ceph_resume"] = r
            rows.append(resume_row("resume, Glance on Ceph (RBD)", r))
    finally:
        log("stopping the Ceph control plane")
        bed.down()
    return rows


def _commit() -> str:
    """The checkout's commit, ``+changes`` when its tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+changes" if changed else "")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # stop cleanly (control plane, swtpm, libvirtd down) on Ctrl-C and on SIGTERM,
    # also when started in the background, where SIGINT arrives ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(args.only or SECTIONS)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="edgepin-bench-", dir="/var/tmp"))
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "command": " ".join(["./build.sh bench", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _commit(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    bed: Bed | None = None
    try:
        if only & {"fetch", "resume", "reconcile", "fleet", "placement"}:
            log(f"starting the control plane in {run_dir}")
            bed = Bed(run_dir, shape=args.shape)
            t0 = time.monotonic()
            bed.up()
            raw["controlplane_up_seconds"] = time.monotonic() - t0
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
                if "fetch" in only and args.link_mibps > 0 and size == sizes[0]:
                    link = fetchbench.bench_link(bed, res["image"], args.link_mibps, args.runs, log)
                    raw["fetch_link"] = link
                    lm = link["methods"]
                    rows.append(
                        Row(
                            f"fetch {label}, {args.link_mibps:g} MiB/s link",
                            "edgepin throughput",
                            lm["edgepin"]["mib_per_s"],
                            "MiB/s",
                            "curl",
                            lm["curl"]["mib_per_s"],
                            lm["edgepin"]["throughput_vs_curl"],
                            ">= 0.9x curl",
                        )
                    )
        if bed and image and "resume" in only:
            res = fetchbench.bench_resume(bed, image, log)
            raw["resume"] = res
            rows.append(resume_row("resume, Glance file store", res))
        if bed and "reconcile" in only:
            res = nodebench.bench_node(bed, args.runs, log)
            raw["reconcile"] = res
            rows += node_rows(res)
        if bed and "fleet" in only:
            image_id = image["id"] if image else bed.publish_random(MIB)["id"]
            nodes: list[fleet.SimNode] = []
            for i, n in enumerate(sorted(set(args.fleet))):
                res, nodes = fleet.bench_fleet(
                    bed,
                    n,
                    image_id,
                    args.rounds if i == 0 else 1,
                    args.concurrency,
                    log,
                    args.keystone_cache,
                    nodes,
                    variants=i == 0,
                )
                raw["fleet" if i == 0 else f"fleet_{n}"] = res
                rows += fleet_rows(res)
        if bed and "placement" in only:
            res = placebench.bench_placement(
                bed, args.placement_nodes, args.concurrency, log, run_dir
            )
            raw[f"placement_{args.placement_nodes}"] = res
            rows += placebench.rows(res)
        if bed is not None and only & {"fetch", "resume"} and args.ceph:
            log("stopping the file-store control plane; the Ceph one starts next")
            bed.down()
            bed = None
            rows += ceph_sections(args, only, run_dir / "ceph", raw)
        if "startcheck" in only:
            res = startcheck.bench(run_dir / "startcheck", args.size_mib, args.runs, log)
            raw["startcheck"] = res
            rows += startcheck.rows(res)
        if "footprint" in only:
            fp = footprint.measure(Path(__file__).resolve().parent.parent / "out")
            raw["footprint"] = fp
            rows += footprint.rows(fp)
            boot = footprint.boot_measure(
                Path(__file__).resolve().parent.parent / "out" / "results"
            )
            raw["boot"] = boot
            rows += footprint.boot_rows(boot)
        if "rootread" in only:
            res = rootread.bench(
                Path(__file__).resolve().parent.parent / "out", run_dir / "rootread", log
            )
            raw["rootread"] = res
            rows += rootread.rows(res)
    except BaseException as e:
        # what was measured before the failure is kept: table and JSON, marked failed
        meta["failed"] = f"{type(e).__name__}: {e}"[:500]
        meta["loadavg_end"] = os.getloadavg()
        if rows or raw:
            report.print_table(rows)
            path = report.write_json(args.out, meta, rows, raw)
            log(f"failed: {meta['failed']}; the figures measured until then are in {path}")
        raise
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
