"""The benchmarks' statistics and the parsing they rely on (pure logic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import servicelog, stats
from benchmarks.footprint import _packages

pytestmark = pytest.mark.unit


def test_median_odd_and_even() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        stats.median([])


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(x) for x in range(1, 101)]  # 1..100
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 100.0
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile(values, 101)


def test_ratio_and_throughput() -> None:
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(1.0, 0.0) is None
    assert stats.throughput(256 * 1024 * 1024, 2.0) == 128.0
    with pytest.raises(ValueError):
        stats.throughput(1, 0)


def test_access_log_counts_tokens_and_routes() -> None:
    reqs = {
        "keystone": [
            ("POST", "/v3/auth/tokens"),
            ("GET", "/v3/projects/0123456789abcdef0123456789abcdef"),
            ("GET", "/v3/auth/tokens"),
        ],
        "glance": [("GET", "/v2/images/12345678-1234-1234-1234-123456789abc")],
        "barbican": [],
    }
    counts = servicelog.summarize(reqs)
    assert counts["keystone"] == 3 and counts["glance"] == 1 and counts["barbican"] == 0
    assert counts["tokens_issued"] == 1 and counts["token_validations"] == 1
    assert servicelog.by_route(reqs["glance"]) == {"GET /v2/images/{id}": 1}
    line = '127.0.0.1 - - [x] "GET /v3 HTTP/1.1" 200 1 "-" "ua"'
    m = servicelog.REQUEST.search(line)
    assert m and m.groups() == ("GET", "/v3")


def test_manifest_packages_largest_first() -> None:
    manifest = {
        "packages": [
            {"name": "a", "installed_size_kib": 10},
            {"name": "b", "installed_size_kib": 30},
            {"name": "c"},
        ]
    }
    assert _packages(manifest) == [("b", 30 * 1024), ("a", 10 * 1024)]
    assert _packages({"packages": {"x": {"Installed-Size": "4"}}}) == [("x", 4096)]
    # the form the image build writes (provisioner/imagemanifest.py)
    assert _packages({"packages": [{"package": "apt", "installed_kib": 2}]}) == [("apt", 2048)]


def test_footprint_reports_the_image_and_its_root_against_the_installed_size(
    tmp_path: Path,
) -> None:
    from benchmarks import footprint

    (tmp_path / footprint.IMAGE).write_bytes(b"q" * (3 << 20))
    (tmp_path / "edgepin-host.manifest.json").write_text(
        json.dumps(
            {
                "packages": [{"package": "linux-image", "installed_kib": 8 * 1024}],
                "root_image": {"format": "squashfs", "bytes": 2 << 20, "sha256": "ab" * 32},
            }
        )
    )
    rows = {r.metric: r for r in footprint.rows(footprint.measure(tmp_path))}
    assert rows["host image qcow2"].value == 3.0 and rows["host image qcow2"].ratio == 0.375
    assert rows["host image qcow2"].goal == "at most 200 MiB"
    assert rows["root filesystem (squashfs, zstd)"].ratio == 0.25


def test_boot_rows_read_the_qa_timelines(tmp_path: Path) -> None:
    from benchmarks import footprint

    node = tmp_path / "node-image"
    node.mkdir()
    (node / "timeline.json").write_text(
        json.dumps(
            {
                "first-boot": {"kernel": 30.0, "enrolled": 200.0, "guest running": 400.0},
                "offline-reboot": {"guest running": 100.0},
            }
        )
    )
    rows = {r.metric: r for r in footprint.boot_rows(footprint.boot_measure(tmp_path))}
    assert rows["first boot (TCG): enrolled"].ratio == 0.5
    assert rows["first boot (TCG): firmware"].value is None
    assert rows["offline reboot: guest running (cache + sealed key)"].ratio == 0.25
    assert footprint.boot_rows(footprint.boot_measure(tmp_path / "none"))[0].value is None


def _round(per_second: float, errors: int = 0) -> dict[str, Any]:
    return {
        "per_second": per_second,
        "p50": 0.5,
        "p99": 1.0,
        "errors": errors,
        "requests_per_node": {"keystone": 2.0, "glance": 0.0, "barbican": 0.0, "tokens_issued": 1},
        "cpu_seconds_per_reconcile": {"keystone": 0.4, "glance": 0.0, "barbican": 0.0},
        "client_cpu_seconds_per_reconcile": 0.01,
    }


def test_fleet_rows_without_variants_and_resume_rows() -> None:
    """A bigger fleet runs the baseline, new-token and kept-token rounds, not the metadata
    round; the kept token (what a node does) comes first with its goal, and a failed
    reconcile shows in the table instead of vanishing."""
    from benchmarks.__main__ import fleet_rows, resume_row

    res = {
        "nodes": 1000,
        "baseline": _round(200.0),
        "nochange": _round(2.0, errors=3),
        "kept_token": {
            **_round(60.0),
            "memcached": {
                "get_hits": 900,
                "get_misses": 100,
                "evictions": 7,
                "curr_items": 2000,
                "bytes": 16 * 1024 * 1024,
                "limit_maxbytes": 64 * 1024 * 1024,
            },
        },
        "setup_seconds": 120.0,
        "setup_nodes": 900,
    }
    got = fleet_rows(res)
    rows = {r.metric: r for r in got}
    kept = "no change, kept token (what a node does)"
    assert got[0].metric == f"{kept}: reconciles/s" and got[0].goal == ">= 50/s"
    assert got[0].ratio == 0.3
    assert rows["no change, issuing a token: reconciles/s"].ratio == 0.01
    assert rows["no change, issuing a token: failed reconciles"].value == 3
    assert rows[f"{kept}: failed reconciles"].value == 0
    assert rows[f"{kept}: memcached gets that hit"].value == 90.0
    assert rows[f"{kept}: memcached evictions"].value == 7
    held = rows[f"{kept}: memcached held after the round (2000 items)"]
    assert (held.value, held.baseline_value, held.ratio) == (16.0, 64.0, 0.25)
    assert rows["set-up: 900 nodes enrolled (Keystone's managers)"].value == 120.0
    assert "no change, issuing a token: memcached evictions" not in rows
    assert not any(m.startswith("with image metadata") for m in rows)
    assert {r.section for r in rows.values()} == {"fleet N=1000"}

    common = {"image_bytes": 100, "transferred_bytes": 150}
    ceph = resume_row(
        "resume, Ceph", {**common, "transferred_vs_size": 1.5, "restarted_from_zero": True}
    )
    assert "from byte 0" in ceph.metric and ceph.goal == "converges, no loop"
    file = resume_row(
        "resume, file", {**common, "transferred_vs_size": 1.02, "restarted_from_zero": False}
    )
    assert file.goal == "<= 1.05" and file.ratio == 1.02


def test_the_markdown_table_names_its_run_and_escapes_cells() -> None:
    from benchmarks.report import Row, markdown

    meta = {
        "command": "./build.sh bench --only fleet",
        "commit": "abc1234",
        "started": "2026-12-05T00:00:00+0000",
        "finished": "2026-12-05T00:10:00+0000",
        "cpus": 2,
        "loadavg_start": [0.5, 0.4, 0.3],
        "loadavg_end": [1.25, 1.0, 0.9],
    }
    rows = [
        Row("fleet N=10", "kept token: reconciles/s", 61.234, "/s", "bare GET /v3", 120.0, 0.51),
        Row("fetch", "curl | openssl", 2.5, "s", goal=">= 50/s"),
        Row("boot", "no results", None, ""),
    ]
    text = markdown(meta, rows, "20261205T001000")
    lines = text.splitlines()
    assert lines[0] == (
        "Run `20261205T001000`: `./build.sh bench --only fleet` at commit abc1234, "
        "2026-12-05T00:00:00+0000 to 2026-12-05T00:10:00+0000, 2 CPUs, load average 0.5-1.2"
    )
    assert lines[4] == (
        "| fleet N=10 | kept token: reconciles/s | 61.2 /s | bare GET /v3 = 120 | 0.51x |  |"
    )
    assert lines[5] == "| fetch | curl \\| openssl | 2.5 s |  |  | >= 50/s |"
    assert lines[6] == "| boot | no results | - |  |  |  |"
    assert all(line.count(" | ") == 5 for line in lines[4:])
    failed = markdown({**meta, "failed": "BenchError: x"}, rows, "n")
    assert "FAILED: BenchError: x" in failed.splitlines()[0]


def test_fetch_rows_compare_edgepin_with_the_least_a_verified_download_does() -> None:
    """Besides curl -o, the fetch is set against curl | openssl dgst -sha512 on the same
    bytes (throughput and CPU) and against one core's SHA-512, which no verified download
    beats; the peak RSS rows stay for the three methods that have one."""
    from benchmarks.__main__ import fetch_rows

    def method(mib_per_s: float, rss: float | None = None) -> dict[str, Any]:
        m: dict[str, Any] = {"mib_per_s": mib_per_s, "throughput_vs_curl": mib_per_s / 500}
        if rss is not None:
            m |= {"peak_rss_mib": rss, "peak_rss_vs_curl": rss / 12}
        return m

    edgepin = method(250.0, 48.0) | {
        "throughput_vs_curl_sha512": 250.0 / 300.0,
        "cpu_seconds_per_gib": 6.0,
        "cpu_vs_curl_sha512": 1.2,
        "fetch_cpu_seconds_per_gib": 5.5,
        "fetch_cpu_vs_curl_sha512": 1.1,
    }
    res = {
        "image_bytes": 1024 * 1024 * 1024,
        "sha512_one_core_mib_per_s": 400.0,
        "methods": {
            "curl": method(500.0, 12.0) | {"seconds_median": 2.048},
            "curl_sha512": method(300.0) | {"cpu_seconds_per_gib": 5.0},
            "edgepin": edgepin,
            "naive": method(50.0, 2000.0),
        },
    }
    rows = {r.metric: r for r in fetch_rows("1024 MiB", res)}
    least = rows["curl | openssl dgst -sha512 throughput (the least a verified download does)"]
    assert (least.value, least.ratio) == (300.0, 0.6)
    against = rows["edgepin throughput against the least a verified download does"]
    assert (against.baseline_value, round(against.ratio or 0, 3)) == (300.0, 0.833)
    sha = rows["SHA-512 on one core (hashlib; no verified download is faster)"]
    assert (sha.value, sha.ratio) == (400.0, 0.8)
    assert rows["edgepin throughput"].goal == ">= 0.8x curl at 1 GiB"
    assert rows["edgepin CPU per GiB (its process)"].ratio == 1.2
    assert {m for m in rows if m.endswith("peak RSS")} == {
        "curl peak RSS",
        "edgepin peak RSS",
        "naive peak RSS",
    }


def test_rootread_reports_each_squashfs_against_the_uncompressed_one(tmp_path: Path) -> None:
    from benchmarks import rootread

    res = {
        "files": 18476,
        "variants": {
            "the image's (zstd, 128 KiB, no fragments)": {"bytes": 160 << 20, "kernel_s": 4.8},
            "zstd, 128 KiB, with fragments": {"bytes": 155 << 20, "kernel_s": 8.9},
            "uncompressed": {"bytes": 480 << 20, "kernel_s": 3.2},
        },
    }
    rows = {r.metric: r for r in rootread.rows(res)}
    read = rows["read 18,476 files at random: zstd, 128 KiB, with fragments"]
    assert read.ratio is not None and abs(read.ratio - 8.9 / 3.2) < 1e-9
    assert rows["squashfs size: uncompressed"].ratio == 1.0
    # nothing built (or not root): one row that says why, no figures
    (skipped,) = rootread.rows(rootread.bench(tmp_path / "none", tmp_path / "w", print))
    assert skipped.value is None and "not built" in skipped.goal
