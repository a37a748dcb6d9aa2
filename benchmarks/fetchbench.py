"""1. Fetch and 2. resume: edgepin's fetch against ``curl -o`` and the naive chain.

- ``curl``: ``curl -o FILE`` of the image, alone (the baseline for throughput and memory);
- ``curl | openssl``: ``curl`` piped into ``openssl dgst -sha512``, the least work a
  verified download must do (the baseline for CPU-seconds per GiB: TLS and SHA-512; its
  throughput is what any verified download reaches with Glance on the same cores);
- ``edgepin``: provisioner.node.fetch in its own process: download, sha512, signature,
  fsync, qemu-img check, rename;
- ``naive``: openstacksdk ``download_image`` to a file, then ``sha512sum``, then
  ``qemu-img check`` (which needs the image's key from Barbican to open a LUKS qcow2).

Runs are interleaved (curl, curl | openssl, edgepin, naive, curl, ...) so that drift on the
shared machine hits all alike; one warm-up curl first puts the image in the page cache for all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import procstat, stats
from benchmarks.bed import MIB, Bed, BenchError
from tests.testbed.faultproxy import FaultProxy

PY = sys.executable


def _curl(
    bed: Bed, image_id: str, out: Path, header: Path, endpoint: str | None = None
) -> procstat.Run:
    url = f"{endpoint or bed.cp.url('glance')}/v2/images/{image_id}/file"
    r = procstat.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--cacert",
            str(bed.cp.ca_path),
            "-H",
            f"@{header}",
            "-o",
            str(out),
            url,
        ]
    )
    if r.returncode != 0:
        raise BenchError(f"curl failed: {r.stderr.decode(errors='replace')[-300:]}")
    return r


def _curl_sha512(bed: Bed, image_id: str, header: Path) -> tuple[procstat.Run, str]:
    """curl into ``openssl dgst -sha512``: TLS and the hash, nothing written."""
    url = f"{bed.cp.url('glance')}/v2/images/{image_id}/file"
    r = procstat.run(
        [
            "bash",
            "-c",
            "set -o pipefail; "
            'curl -sS --fail --cacert "$1" -H "@$2" "$3" | openssl dgst -sha512 -r',
            "curl-sha512",
            str(bed.cp.ca_path),
            str(header),
            url,
        ]
    )
    if r.returncode != 0:
        raise BenchError(f"curl | openssl failed: {r.stderr.decode(errors='replace')[-300:]}")
    return r, r.stdout.split()[0].decode()


def _edgepin(
    bed: Bed, image: dict[str, Any], images_dir: Path, endpoint: str
) -> tuple[procstat.Run, dict[str, Any]]:
    signer = bed.make_signer()
    cfg = {
        "endpoint": endpoint,
        "token": bed.token(),
        "ca": str(bed.cp.ca_path),
        "image": image,
        "cert_pem": str(signer.pem_path),
        "images_dir": str(images_dir),
    }
    r = procstat.run(
        [PY, "-m", "benchmarks.worker", "edgepin-fetch"], stdin=json.dumps(cfg).encode()
    )
    try:
        result: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(
            f"edgepin fetch worker died: {r.stderr.decode(errors='replace')[-800:]}"
        ) from None
    return r, result


def _naive(bed: Bed, image: dict[str, Any], out: Path, passphrase: bytes) -> tuple[float, int]:
    cfg = {**bed.admin_auth(), "image_id": image["id"], "output": str(out)}
    steps = [
        procstat.run(
            [PY, "-m", "benchmarks.worker", "sdk-download"], stdin=json.dumps(cfg).encode()
        ),
        procstat.run(["sha512sum", str(out)]),
        procstat.run(
            [
                "qemu-img",
                "check",
                "--object",
                "secret,id=sec0,file=/dev/stdin",
                "--image-opts",
                f"driver=qcow2,file.filename={out},encrypt.key-secret=sec0",
            ],
            stdin=passphrase,
        ),
    ]
    for name, s in zip(("download", "sha512sum", "qemu-img check"), steps, strict=True):
        if s.returncode != 0:
            raise BenchError(
                f"naive chain: {name} failed: {s.stderr.decode(errors='replace')[-300:]}"
            )
    if steps[1].stdout.split()[0].decode() != image["os_hash_value"]:
        raise BenchError("naive chain: sha512sum differs from os_hash_value")
    return sum(s.seconds for s in steps), max(s.max_rss_kib for s in steps)


def sha512_speed(mib: int = 256) -> float:
    """MiB/s of hashlib's SHA-512 (OpenSSL) on one core, from this thread's CPU time: no
    verified download, whatever its pipeline, goes faster than this on this machine."""
    block = os.urandom(MIB)
    h = hashlib.sha512()
    t0 = time.thread_time()
    for _ in range(mib):
        h.update(block)
    return mib / (time.thread_time() - t0)


def bench_fetch(bed: Bed, size: int, runs: int, log: Any) -> dict[str, Any]:
    log(f"fetch: publishing a {size // MIB} MiB image")
    image = bed.publish_random(size)
    image_id = image["id"]
    real = int(image["size"])
    if runs == 0:  # only the image, for the resume section
        return {"image": image, "image_bytes": real, "methods": {}}
    work = bed.run_dir / f"fetch-{size // MIB}m"
    work.mkdir(parents=True, exist_ok=True)
    header = bed.token_header_file()
    passphrase = bed.admin.key_manager.get(
        f"/secrets/{image['os_encrypt_key_id'].rsplit('/', 1)[-1]}/payload",
        headers={"Accept": "text/plain"},
    ).content
    out = work / "out.img"
    _curl(bed, image_id, out, header)  # warm-up: page cache, connections
    out.unlink()
    times: dict[str, list[float]] = {"curl": [], "curl_sha512": [], "edgepin": [], "naive": []}
    rss: dict[str, list[int]] = {"curl": [], "edgepin": [], "naive": []}
    # CPU-seconds (user + system) of the client side, all its processes and threads
    cpu: dict[str, list[float]] = {"curl_sha512": [], "edgepin": [], "edgepin_fetch": []}
    in_process: list[float] = []
    glance_cpu: list[float] = []
    glance_pgid = bed.service_pgids()["glance"]
    for i in range(runs):
        log(f"fetch {size // MIB} MiB: run {i + 1}/{runs}")
        r = _curl(bed, image_id, out, header)
        if out.stat().st_size != real:
            raise BenchError("curl wrote a file of the wrong size")
        out.unlink()
        times["curl"].append(r.seconds)
        rss["curl"].append(r.max_rss_kib)

        r, digest = _curl_sha512(bed, image_id, header)
        if digest != image["os_hash_value"]:
            raise BenchError("curl | openssl: the sha512 differs from os_hash_value")
        cpu["curl_sha512"].append(r.cpu_seconds)
        times["curl_sha512"].append(r.seconds)

        images_dir = work / "images"
        cpu0 = procstat.group_cpu_seconds(glance_pgid)
        r, res = _edgepin(bed, image, images_dir, bed.cp.url("glance"))
        glance_cpu.append(procstat.group_cpu_seconds(glance_pgid) - cpu0)
        if not res["ok"]:
            raise BenchError(f"edgepin fetch failed: {res.get('error')}")
        shutil.rmtree(images_dir)
        in_process.append(res["fetch_seconds"])
        cpu["edgepin"].append(r.cpu_seconds)
        cpu["edgepin_fetch"].append(res["fetch_cpu_seconds"])
        times["edgepin"].append(r.seconds)
        rss["edgepin"].append(r.max_rss_kib)

        seconds, peak = _naive(bed, image, out, passphrase)
        out.unlink()
        times["naive"].append(seconds)
        rss["naive"].append(peak)
    base_t = stats.median(times["curl"])
    base_rss = stats.median(rss["curl"])
    methods = {}
    for m in times:
        t = stats.median(times[m])
        methods[m] = {
            "seconds_median": t,
            "seconds_all": times[m],
            "mib_per_s": stats.throughput(real, t),
            "throughput_vs_curl": stats.ratio(base_t, t),
        }
        if rss.get(m):
            methods[m]["peak_rss_mib"] = stats.median(rss[m]) / 1024
            methods[m]["peak_rss_vs_curl"] = stats.ratio(stats.median(rss[m]), base_rss)
    if in_process:
        # the fetch alone, without the process's start and imports
        t = stats.median(in_process)
        methods["edgepin"]["in_process_seconds_median"] = t
        methods["edgepin"]["in_process_mib_per_s"] = stats.throughput(real, t)
        methods["edgepin"]["in_process_vs_curl"] = stats.ratio(base_t, t)
    if cpu["curl_sha512"]:
        gib = real / (1024 * MIB)
        base_cpu = stats.median(cpu["curl_sha512"]) / gib
        methods["curl_sha512"].update(cpu_seconds_per_gib=base_cpu, cpu_all=cpu["curl_sha512"])
        # edgepin against the least work a verified download does, on the same machine
        methods["edgepin"]["throughput_vs_curl_sha512"] = stats.ratio(
            stats.median(times["curl_sha512"]), stats.median(times["edgepin"])
        )
        for key, values in (("cpu", cpu["edgepin"]), ("fetch_cpu", cpu["edgepin_fetch"])):
            per_gib = stats.median(values) / gib
            methods["edgepin"][f"{key}_seconds_per_gib"] = per_gib
            methods["edgepin"][f"{key}_vs_curl_sha512"] = stats.ratio(per_gib, base_cpu)
            methods["edgepin"][f"{key}_all"] = values
    if glance_cpu:
        methods["edgepin"]["glance_cpu_seconds_per_gib"] = stats.median(glance_cpu) / (
            real / (1024 * MIB)
        )
    return {
        "image_bytes": real,
        "runs": runs,
        "methods": methods,
        "sha512_one_core_mib_per_s": sha512_speed(),
        "image_id": image_id,
        "image": image,
    }


def bench_resume(bed: Bed, image: dict[str, Any], log: Any) -> dict[str, Any]:
    """Cut the download at 50% (connection reset at a loopback proxy), then run again."""
    size = int(image["size"])
    tls = bed.cp.run_dir / "tls"
    proxy = FaultProxy(
        bed.cp.url("glance"), bed.cp.ca_path, tls / "server.pem", tls / "server-key.pem"
    )
    proxy.start()
    images_dir = bed.run_dir / "resume" / "images"
    try:
        cut = size // 2
        proxy.fault = ("reset", cut)
        log("resume: first fetch, cut at 50%")
        r1, res1 = _edgepin(bed, image, images_dir, proxy.url)
        if res1["ok"]:
            raise BenchError("resume: the cut fetch succeeded; the proxy did not cut it")
        kept = (images_dir / f"{image['id']}.partial").stat().st_size
        proxy.fault = None
        log("resume: second fetch")
        r2, res2 = _edgepin(bed, image, images_dir, proxy.url)
        if not res2["ok"]:
            raise BenchError(f"resume: the second fetch failed: {res2.get('error')}")
        requests = list(proxy.requests)
    finally:
        proxy.stop()
        shutil.rmtree(images_dir, ignore_errors=True)
    transferred = cut + int(res2["bytes_fetched"])
    return {
        "image_bytes": size,
        "cut_at_bytes": cut,
        "kept_after_cut_bytes": kept,
        "resumed_from": res2["resumed_from"],
        "restarted_from_zero": res2["restarted"],
        "second_fetch_bytes": res2["bytes_fetched"],
        "transferred_bytes": transferred,
        "transferred_vs_size": stats.ratio(transferred, size),
        "requests": requests,
        "seconds": [r1.seconds, r2.seconds],
    }


def bench_link(
    bed: Bed, image: dict[str, Any], mib_per_s: float, runs: int, log: Any
) -> dict[str, Any]:
    """curl and edgepin through a loopback proxy that throttles to an edge link's rate."""
    size = int(image["size"])
    tls = bed.cp.run_dir / "tls"
    proxy = FaultProxy(
        bed.cp.url("glance"), bed.cp.ca_path, tls / "server.pem", tls / "server-key.pem"
    )
    proxy.start()
    proxy.fault = ("slow", int(mib_per_s * MIB))
    work = bed.run_dir / "link"
    work.mkdir(parents=True, exist_ok=True)
    header = bed.token_header_file()
    times: dict[str, list[float]] = {"curl": [], "edgepin": []}
    try:
        for i in range(runs):
            log(f"fetch over a {mib_per_s:g} MiB/s link: run {i + 1}/{runs}")
            out = work / "out.img"
            r = _curl(bed, image["id"], out, header, proxy.url)
            out.unlink()
            times["curl"].append(r.seconds)
            images_dir = work / "images"
            r, res = _edgepin(bed, image, images_dir, proxy.url)
            if not res["ok"]:
                raise BenchError(f"edgepin fetch over the link failed: {res.get('error')}")
            shutil.rmtree(images_dir)
            times["edgepin"].append(r.seconds)
    finally:
        proxy.stop()
    base = stats.median(times["curl"])
    return {
        "link_mib_per_s": mib_per_s,
        "image_bytes": size,
        "runs": runs,
        "methods": {
            m: {
                "seconds_median": stats.median(t),
                "seconds_all": t,
                "mib_per_s": stats.throughput(size, stats.median(t)),
                "throughput_vs_curl": stats.ratio(base, stats.median(t)),
            }
            for m, t in times.items()
        },
    }
