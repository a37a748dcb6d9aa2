"""6. Placement: ``edgepin plan`` and ``edgepin apply`` for a fleet of N nodes.

The nodes are "paper" nodes (tests/testbed/fleet.py): in Keystone and Glance exactly as
``edgepin enroll`` leaves a node and with the report its node would write (labels, facts),
but no TPM and no libvirt: plan and apply read and write only the control plane, so that
is all a node needs here. One image, one rule selecting every node of the fleet.

Measured, each as a process of the installed ``edgepin``: ``plan`` three times (the outputs
must be byte-identical), ``apply`` once (every node assigned), ``apply`` again (nothing
left to do), with the requests each service saw (access logs) and the control plane's CPU.

Baselines, in the same run: for ``plan``, listing the fleet's projects and users (the
least any tool reads to know a fleet); for ``apply``, one project update per node with the
same parallelism (the least any tool writes to change a fleet: one record per node); and
``edgepin assign`` of single nodes, times N: the fleet assigned one node at a time.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import procstat, servicelog, stats
from benchmarks.bed import MIB, Bed, BenchError
from provisioner.operator import nodes, parallel
from tests.testbed.controlplane import EDGE_DOMAIN
from tests.testbed.fleet import make_fleet
from tests.testbed.node import run_edgepin

SINGLE_ASSIGNS = 3


def _measured(bed: Bed, work: Callable[[], Any]) -> tuple[float, dict[str, Any], Any]:
    """Wall time, requests and control-plane CPU of ``work``."""
    pgids = bed.service_pgids()
    logs = servicelog.AccessLogs(bed.cp.run_dir)
    cpu0 = {s: procstat.group_cpu_seconds(p) for s, p in pgids.items()}
    t0 = time.monotonic()
    result = work()
    wall = time.monotonic() - t0
    time.sleep(0.5)  # let the access logs catch up
    cpu = {s: procstat.group_cpu_seconds(p) - cpu0[s] for s, p in pgids.items()}
    reqs = logs.since()
    seen = {
        "requests": servicelog.summarize(reqs),
        "cpu_seconds": cpu,
        "routes": {s: servicelog.by_route(r) for s, r in reqs.items()},
    }
    return wall, seen, result


def _edgepin(bed: Bed, env: dict[str, str], *args: str) -> str:
    r = run_edgepin(list(args), {**bed.cli_env, **env}, timeout=7200)
    if r.returncode != 0:
        raise BenchError(f"edgepin {args[0]} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r.stdout


def bench_placement(
    bed: Bed, n: int, workers: int, log: Callable[[str], None], run_dir: Path
) -> dict[str, Any]:
    admin = bed.admin
    domain_id = admin.identity.find_domain(EDGE_DOMAIN, ignore_missing=False).id
    env = bed.signing_env()
    image = bed.publish_random(MIB)
    tag = f"b{secrets.token_hex(3)}"
    log(f"placement: making {n} nodes (project, user, report image) {workers} at a time")
    t0 = time.monotonic()
    paper = make_fleet(
        admin,
        domain_id,
        n,
        lambda i: {"fleet": tag, "site": f"s{i % 50:02d}"},
        prefix=tag,
        workers=workers,
    )
    setup = time.monotonic() - t0
    log(f"placement: {n} nodes in {setup:.0f} s")
    f = run_dir / f"placement-{tag}.yaml"
    f.write_text(
        json.dumps(
            {
                "placement": 1,
                "rules": [{"name": "all", "select": {"fleet": tag}, "image": {"id": image["id"]}}],
            }
        )
    )

    log("placement: baseline: list the fleet's projects and users")

    def listing() -> None:
        # page by page (1,000 per request), as edgepin reads a fleet
        for path, key in (("/projects", "projects"), ("/users", "users")):
            if len(nodes._listing(admin, path, {"domain_id": domain_id}, key)) < n:
                raise BenchError(f"placement: the {key} listing is short")

    list_s, list_seen, _ = _measured(bed, listing)

    plans: list[str] = []
    plan_runs = []
    for i in range(3):
        log(f"placement: edgepin plan, run {i + 1} of 3")
        wall, seen, out = _measured(bed, lambda: _edgepin(bed, env, "plan", str(f)))
        plans.append(out)
        plan_runs.append({"seconds": wall, **seen})
    if len(set(plans)) != 1:
        raise BenchError("placement: two plans of the same inputs differ")
    counts = plans[0].splitlines()[0]

    log(f"placement: edgepin apply ({counts}), {workers} at a time")
    wall, apply_seen, out = _measured(
        bed,
        lambda: _edgepin(bed, env, "apply", str(f), "--workers", str(workers), "--json"),
    )
    applied = json.loads(out)
    assigned = len(applied["assigned"])
    if applied["failed"] or assigned < n:
        raise BenchError(f"placement: apply assigned {assigned} of {n}: {applied['failed'][:3]}")
    apply_run = {"seconds": wall, "assigned": assigned, **apply_seen}

    log("placement: edgepin apply again (nothing to do)")
    again_s, again_seen, out = _measured(bed, lambda: _edgepin(bed, env, "apply", str(f), "--json"))
    if json.loads(out)["assigned"]:
        raise BenchError("placement: a second apply assigned nodes again")

    log(f"placement: baseline: one project update per node, {workers} at a time")

    def write_all() -> None:
        def one(p: Any) -> None:
            # as apply writes a record: a 5xx (SQLite's "database is locked") is sent again
            nodes.update_project(admin, p.project_id, {"edgepin_bench": secrets.token_hex(4)})

        parallel.bounded_map(one, paper, workers)

    write_s, write_seen, _ = _measured(bed, write_all)

    log(f"placement: baseline: edgepin assign of {SINGLE_ASSIGNS} single nodes")
    other = bed.publish_random(MIB)
    singles = []
    for p in paper[:SINGLE_ASSIGNS]:
        wall, _, _ = _measured(
            bed, functools.partial(_edgepin, bed, env, "assign", p.name, other["id"], "--json")
        )
        singles.append(wall)
    single = stats.median(singles)
    return {
        "nodes": n,
        "workers": workers,
        "setup_seconds": setup,
        "baseline_list": {"seconds": list_s, **list_seen},
        "plan": plan_runs,
        "plan_seconds_median": stats.median([r["seconds"] for r in plan_runs]),
        "plan_identical": True,
        "plan_counts": counts,
        "apply": apply_run,
        "apply_again_seconds": again_s,
        "apply_again": again_seen,
        "baseline_write": {"seconds": write_s, **write_seen},
        "single_assign_seconds": singles,
        "single_assign_times_n_seconds": single * n,
    }


def rows(res: dict[str, Any]) -> list[Any]:
    from benchmarks.report import Row

    n: int = res["nodes"]
    sec = f"placement N={n}"
    a, w = res["apply"], res["baseline_write"]

    def per_node(seen: dict[str, Any], service: str) -> float:
        return float(seen["requests"][service]) / n

    out = [
        Row(
            sec,
            "edgepin plan (median of 3; byte-identical)",
            res["plan_seconds_median"],
            "s",
            "list projects + users",
            res["baseline_list"]["seconds"],
            stats.ratio(res["plan_seconds_median"], res["baseline_list"]["seconds"]),
            "minutes",
        ),
        Row(
            sec,
            "edgepin apply, every node assigned",
            a["seconds"],
            "s",
            "1 project update/node",
            w["seconds"],
            stats.ratio(a["seconds"], w["seconds"]),
            "minutes",
        ),
        Row(
            sec,
            "edgepin apply",
            a["seconds"],
            "s",
            "edgepin assign x N",
            res["single_assign_times_n_seconds"],
            stats.ratio(a["seconds"], res["single_assign_times_n_seconds"]),
        ),
        Row(
            sec,
            "edgepin apply again (nothing to do)",
            res["apply_again_seconds"],
            "s",
            "list projects + users",
            res["baseline_list"]["seconds"],
            stats.ratio(res["apply_again_seconds"], res["baseline_list"]["seconds"]),
        ),
    ]
    base_ks = per_node(w, "keystone")
    out.append(
        Row(
            sec,
            "apply: keystone requests/node",
            per_node(a, "keystone"),
            "",
            "1 project update/node",
            base_ks,
            stats.ratio(per_node(a, "keystone"), base_ks),
        )
    )
    for service in ("glance", "barbican"):
        total = float(a["requests"][service])
        out.append(Row(sec, f"apply: {service} requests/node ({total:.0f} in all)", total / n, ""))
    reads = sum(
        count
        for route, count in a["routes"]["glance"].items()
        if route.startswith("GET /v2/images/{id}")
    )
    out.append(
        Row(
            sec,
            "apply: reads of the image's record (GET /v2/images/{id}), in all",
            float(reads),
            "",
        )
    )
    plan0 = res["plan"][0]
    out.append(
        Row(
            sec,
            "plan: requests in all (keystone+glance+barbican)",
            sum(plan0["requests"][s] for s in ("keystone", "glance", "barbican")),
            "",
            "list projects + users",
            res["baseline_list"]["requests"]["keystone"],
            None,
        )
    )
    return out
