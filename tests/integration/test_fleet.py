"""Labels, node reports and the fleet view, against the real test bed with virtual nodes."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from keystoneauth1 import session as ksa_session
from keystoneauth1.identity import v3

from provisioner import nodereport, tpm
from provisioner.node.model import State
from tests.integration.conftest import make_signer
from tests.testbed.controlplane import ControlPlane
from tests.testbed.fleet import (
    FACTS,
    assignment_of,
    make_fleet,
    report_text,
    small,
    write_report,
)
from tests.testbed.node import EDGEPIN, VirtualNode, run_edgepin
from tests.testbed.operator import Signer, assign, enroll_node

pytestmark = pytest.mark.integration


def ok(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def fleet_status(cli_env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        ok(run_edgepin(["status", *args, "--json"], cli_env)).stdout
    )
    return rows


def node_session(node: VirtualNode, controlplane: ControlPlane) -> Any:
    """A session with the node's own credential, unsealed from its TPM (what a node, or
    whoever controls one, can do with it)."""
    cred = json.loads((node.root / "var/lib/edgepin/node-credential.json").read_text())
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    with tpm.Tpm.open(node.tpm.tcti) as t:
        secret = t.unseal(base64.b64decode(cred["sealed"]), [7]).decode()
    return ksa_session.Session(
        auth=v3.ApplicationCredential(
            auth_url=bundle["auth_url"],
            application_credential_id=cred["id"],
            application_credential_secret=secret,
        ),
        verify=str(controlplane.ca_path),
    )


def project_of(admin: Any, name: str) -> dict[str, Any]:
    r = admin.identity.get("/projects", params={"name": name})
    project: dict[str, Any] = r.json()["projects"][0]
    return project


def test_labels_are_project_tags(
    virtual_node: VirtualNode, cli_env: dict[str, str], signer: Signer, run_dir: Path, admin: Any
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    r = ok(run_edgepin(["label", node.name, "site=paris-1", "hw=small", "--json"], cli_env))
    assert json.loads(r.stdout)["labels"] == {"hw": "small", "site": "paris-1"}
    tags = project_of(admin, node.name)["tags"]
    assert sorted(tags) == ["edgepin-label:hw=small", "edgepin-label:site=paris-1", "edgepin-node"]
    # a new value replaces the old one; KEY- removes; other tags stay
    ok(run_edgepin(["label", node.name, "site=lyon", "hw-"], cli_env))
    assert sorted(project_of(admin, node.name)["tags"]) == [
        "edgepin-label:site=lyon",
        "edgepin-node",
    ]
    assert ok(run_edgepin(["label", node.name], cli_env)).stdout == "site=lyon\n"
    # Keystone filters by them; edgepin status too
    found = admin.identity.get("/projects", params={"tags": "edgepin-label:site=lyon"}).json()
    assert [p["name"] for p in found["projects"]] == [node.name]
    assert [r["node"] for r in fleet_status(cli_env, "--label", "site=lyon")] == [node.name]
    assert fleet_status(cli_env, "--label", "site=paris-1") == []
    prom = ok(run_edgepin(["status", "--label", "site=lyon", "--prometheus", "-"], cli_env))
    assert f'edgepin_node_info{{node="{node.name}",' in prom.stdout
    assert 'label_site="lyon"} 1' in prom.stdout
    # a label that is no label is refused before anything changes
    r = run_edgepin(["label", node.name, "Site=Paris"], cli_env)
    assert r.returncode == 2 and "invalid label key" in r.stderr, r.stderr


def test_the_node_reports_its_facts_and_outcome_and_only_its_own(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    controlplane: ControlPlane,
    request: pytest.FixtureRequest,
) -> None:
    node = virtual_node
    # until an image is assigned, the node's image folder is on a filesystem of its own:
    # the free space it reports (in 256 MiB steps) is then what the node does, not what
    # other tests write beside it (an image tier converting 4 GiB disks crossed a step
    # between two reconciles once). Unmounted before a guest needs it: the test bed's
    # libvirtd does not see mounts made after it started.
    images = node.root / "var/lib/edgepin/images"
    images.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0711", "tmpfs", str(images)], check=True
    )
    request.addfinalizer(lambda: subprocess.run(["umount", "-q", str(images)], check=False))
    enroll_node(node, cli_env, signer, run_dir)
    # the host release the image build writes into edgepin.conf
    conf = node.root / "etc/edgepin/edgepin.conf"
    conf.write_text(conf.read_text() + "EDGEPIN_HOST_VERSION=1764940000\n")
    ok(node.node("enroll"))
    row = fleet_status(cli_env, node.name)[0]
    assert row["report"]["problem"] == "no report yet" and row["outcome"] is None

    ok(node.node("reconcile"))  # nothing assigned: waiting, reported
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] == "waiting" and row["reason"] == "no assignment yet", row
    facts = row["report"]["report"]["facts"]
    assert facts["cpus"] >= 2 and facts["guest_cpus"] == facts["cpus"] - 1
    assert facts["memory_mb"] > 256 and facts["disk_free_mb"] > 0
    assert facts["virt_type"] == "qemu" and facts["cpu_flags"], facts
    assert facts["host_version"] == row["host_version"] == 1764940000, row
    # a test bed node boots from no root slot
    assert facts["host_slot"] == "" and row["host_slot"] is None, row
    first_seen = row["seen_at"]
    assert first_seen

    # nothing changed: the next reconcile writes nothing (one Keystone request, no Glance)
    counters = node.root / "var/lib/edgepin/counters.json"
    sent = json.loads(counters.read_text())["report_sent_at"]
    ok(node.node("reconcile"))
    assert json.loads(counters.read_text())["report_sent_at"] == sent
    assert fleet_status(cli_env, node.name)[0]["seen_at"] == first_seen
    subprocess.run(["umount", str(images)], check=True)

    pub = publish(version="7")
    assign(cli_env, node, pub["image_id"])
    ok(node.node("reconcile"))
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] == "running", row
    assert (row["running_image_id"], row["running_generation"]) == (pub["image_id"], 1)
    assert row["running_image"] == row["image"] and row["image"].endswith(" 7")
    assert row["report"]["report"]["facts"]["local_images"] == [pub["image_id"]]

    # the node's credential: its own report record and nothing else
    mine = project_of(admin, node.name)["edgepin_report_image"]
    other = "second-" + node.name
    theirs_seed = run_dir / f"{other}.seed.img"
    ek = run_dir / f"{node.name}.ek.pem"
    r = run_edgepin(
        [
            "enroll",
            other,
            "--ek-cert",
            str(ek),
            "--pcrs",
            "7",
            "--pcr-values",
            "zero",
            "--seed-out",
            str(theirs_seed),
        ],
        cli_env,
    )
    ok(r)
    theirs = project_of(admin, other)["edgepin_report_image"]
    sess = node_session(node, controlplane)
    image = {"service_type": "image", "interface": "public"}
    patch = {"Content-Type": "application/openstack-images-v2.1-json-patch"}
    forged = [{"op": "add", "path": "/edgepin_report", "value": "{}"}]
    r = sess.patch(
        f"/v2/images/{theirs}", endpoint_filter=image, headers=patch, json=forged, raise_exc=False
    )
    assert r.status_code in (401, 403, 404), r.status_code
    # nor any image property of a guest image shared with it
    r = sess.patch(
        f"/v2/images/{pub['image_id']}",
        endpoint_filter=image,
        headers=patch,
        json=forged,
        raise_exc=False,
    )
    assert r.status_code in (401, 403, 404), r.status_code
    assert "edgepin_report" not in admin.image.get(f"/images/{theirs}").json()
    # its own, yes (what the reconcile does)
    r = sess.patch(
        f"/v2/images/{mine}", endpoint_filter=image, headers=patch, json=forged, raise_exc=False
    )
    assert r.status_code == 200, r.status_code
    # and the operator reads a forged report as unreadable, never as facts
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] is None and "unreadable node report" in row["reason"], row
    # Keystone's credential API, where a report could have gone, refuses node credentials
    # outright: why the report is a Glance record
    user_id = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())["user_id"]
    r = sess.post(
        f"{controlplane.auth_url}/credentials",
        json={"credential": {"type": "edgepin-report", "user_id": user_id, "blob": "{}"}},
        raise_exc=False,
    )
    assert r.status_code in (401, 403), r.status_code


# ----------------------------------------------------------------------------- placement


def edge_domain(admin: Any) -> str:
    return str(admin.identity.find_domain("edge", ignore_missing=False).id)


def placement_file(path: Path, rules: list[dict[str, Any]], **extra: Any) -> Path:
    path.write_text(json.dumps({"placement": 1, "rules": rules, **extra}))  # JSON is YAML
    return path


def acl_users(admin: Any, secret_id: str) -> set[str]:
    r = admin.key_manager.get(f"/secrets/{secret_id}/acl")
    return set(r.json().get("read", {}).get("users", []))


def test_plan_leaves_out_what_does_not_fit_and_apply_makes_it_so_once(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    run_dir: Path,
) -> None:
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    site_of = {0: a, 1: a, 2: a, 3: b, 4: b}
    paper = make_fleet(
        admin,
        edge_domain(admin),
        6,
        lambda i: {"site": site_of[i]} if i in site_of else {},
        facts=lambda i: small(guest_cpus=1) if i == 4 else FACTS,
    )
    small_image = publish(version="1")
    big_image = publish(version="2", extra=["--vcpus", "2"])
    big_name = admin.image.get(f"/images/{big_image['image_id']}").json()["name"]
    f = placement_file(
        run_dir / "placement-fit.yaml",
        [
            {"name": "a", "select": {"site": a}, "image": {"id": small_image["image_id"]}},
            {"name": "b", "select": {"site": b}, "image": {"name": big_name, "version": "2"}},
        ],
    )
    first = ok(run_edgepin(["plan", str(f)], cli_env)).stdout
    assert ok(run_edgepin(["plan", str(f)], cli_env)).stdout == first  # byte for byte
    plan = json.loads(ok(run_edgepin(["plan", str(f), "--json"], cli_env)).stdout)
    mine = {e["node"]: e for e in plan["entries"] if e["node"].startswith(paper[0].name[:-6])}
    by = {p.name: mine[p.name] for p in paper}
    assert [by[p.name]["action"] for p in paper] == ["assign"] * 4 + ["left-out"] * 2
    assert by[paper[4].name]["reason"] == (f"{big_name} 2 wants 2 vCPUs; the node has 1 for guests")
    assert by[paper[5].name]["reason"] == "no rule selects it (labels: none)"
    # one line per node, names padded to the longest name of the fleet
    assert [paper[5].name, "no rule selects it (labels: none)"] in [
        [part.strip() for part in line.split(maxsplit=1)[1].split("  ", 1)]
        for line in first.splitlines()
        if line.startswith("left-out ")
    ]

    r = run_edgepin(["apply", str(f), "--plan-digest", "0" * 64], cli_env)
    assert r.returncode == 2 and "--plan-digest" in r.stderr, r.stderr
    r = ok(run_edgepin(["apply", str(f), "--plan-digest", plan["digest"], "--json"], cli_env))
    result = json.loads(r.stdout)
    assigned = {a["node"]: a for a in result["assigned"]}
    assert set(assigned) >= {p.name for p in paper[:4]} and result["failed"] == []
    for p in paper[:4]:
        record = assignment_of(admin, p)
        assert record and record["generation"] == 1 and "signed" in record
    assert assignment_of(admin, paper[4]) is None and assignment_of(admin, paper[5]) is None
    # each node's user reads exactly its image's key
    users = acl_users(admin, small_image["key_id"])
    assert {p.user_id for p in paper[:3]} <= users
    assert not {p.user_id for p in paper[3:]} & users
    assert paper[3].user_id in acl_users(admin, big_image["key_id"])

    # idempotent: again, nothing to do
    again = json.loads(ok(run_edgepin(["apply", str(f), "--json"], cli_env)).stdout)
    assert not {a["node"] for a in again["assigned"]} & {p.name for p in paper}
    for p in paper[:4]:
        assert assignment_of(admin, p)["generation"] == 1  # type: ignore[index]
    # a rule naming no published image: an error, nothing changes
    bad = placement_file(
        run_dir / "placement-bad.yaml",
        [{"name": "a", "select": {"site": a}, "image": {"name": big_name, "version": "9"}}],
    )
    r = run_edgepin(["plan", str(bad)], cli_env)
    assert r.returncode == 2 and "no active edgepin image" in r.stderr, r.stderr


def test_an_interrupted_apply_is_finished_by_running_it_again(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    run_dir: Path,
) -> None:
    site = f"s{secrets.token_hex(3)}"
    paper = make_fleet(admin, edge_domain(admin), 12, lambda i: {"site": site})
    image = publish(version="1")
    f = placement_file(
        run_dir / f"placement-{site}.yaml",
        [{"name": "all", "select": {"site": site}, "image": {"id": image["image_id"]}}],
    )
    proc = subprocess.Popen(
        [EDGEPIN, "apply", str(f), "--workers", "1"],
        env={**os.environ, **cli_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            projects = [
                admin.identity.get(f"/projects/{p.project_id}").json()["project"] for p in paper[:3]
            ]
            if any("edgepin_grants" in pr for pr in projects):
                break
            time.sleep(0.05)
        proc.kill()  # a crash, half-way
    finally:
        proc.wait()
    done = [p for p in paper if assignment_of(admin, p)]
    assert len(done) < len(paper), "the apply finished before it could be interrupted"
    r = ok(run_edgepin(["apply", str(f), "--json"], cli_env))
    result = json.loads(r.stdout)
    assert {a["node"] for a in result["assigned"]} == {p.name for p in paper} - {
        p.name for p in done
    }
    for p in paper:
        record = assignment_of(admin, p)
        assert record and record["image_id"] == image["image_id"] and record["generation"] == 1
    assert {p.user_id for p in paper} <= acl_users(admin, image["key_id"])


def test_a_placed_virtual_node_runs_its_image_and_one_that_does_not_fit_is_left_out(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    ok(node.node("reconcile"))  # reports its facts
    cpus = fleet_status(cli_env, node.name)[0]["report"]["report"]["facts"]["guest_cpus"]
    label = f"t{secrets.token_hex(3)}"
    ok(run_edgepin(["label", node.name, f"test={label}"], cli_env))
    too_big = publish(version="1", extra=["--vcpus", str(cpus + 1)])
    fits = publish(version="2")
    rule = {"name": "r", "select": {"test": label}}
    f = placement_file(
        run_dir / f"{label}-big.yaml", [{**rule, "image": {"id": too_big["image_id"]}}]
    )
    plan = json.loads(ok(run_edgepin(["plan", str(f), "--json"], cli_env)).stdout)
    (entry,) = [e for e in plan["entries"] if e["node"] == node.name]
    assert entry["action"] == "left-out"
    assert entry["reason"].endswith(f"wants {cpus + 1} vCPUs; the node has {cpus} for guests")
    f = placement_file(
        run_dir / f"{label}-fits.yaml", [{**rule, "image": {"id": fits["image_id"]}}]
    )
    ok(run_edgepin(["apply", str(f)], cli_env))
    ok(node.node("reconcile"))
    row = fleet_status(cli_env, node.name)[0]
    assert (row["outcome"], row["running_image_id"]) == ("running", fits["image_id"]), row


# ----------------------------------------------------------------------------- rollouts


@pytest.fixture
def two_nodes(
    make_swtpm: Callable[[str], Any],
    libvirtd_factory: Callable[[str], Any],
    run_dir: Path,
) -> Iterator[list[VirtualNode]]:
    """Two virtual nodes, each with its own swtpm and libvirtd (each node removes every
    libvirt domain but its own)."""
    made, memories = [], []
    for _ in range(2):
        name = f"n{secrets.token_hex(4)}"
        root = run_dir / "nodes" / name
        root.mkdir(parents=True)
        memory = Path(tempfile.mkdtemp(prefix=f"edgepin-{name}-", dir="/dev/shm"))
        (root / "run").symlink_to(memory)
        memories.append(memory)
        made.append(VirtualNode(name, root, make_swtpm(name), libvirtd_factory(name)))
    yield made
    for memory in memories:
        shutil.rmtree(memory, ignore_errors=True)


def apply_json(cli_env: dict[str, str], f: Path, *args: str, code: int = 0) -> dict[str, Any]:
    r = run_edgepin(["apply", str(f), "--json", *args], cli_env)
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def test_a_canary_that_rejects_halts_the_rollout_and_abort_rolls_it_back(
    two_nodes: list[VirtualNode],
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    tag = f"r{secrets.token_hex(3)}"
    for node in two_nodes:
        enroll_node(node, cli_env, signer, run_dir)
        ok(node.node("enroll"))
        ok(node.node("reconcile"))  # waiting: its first report, which placement needs
        ok(run_edgepin(["label", node.name, f"rollout={tag}"], cli_env))
    good = publish(version="1")
    # signed by a key the nodes do not pin: every node refuses it
    unpinned = publish(version="2", signer_=make_signer(cli_env, run_dir))
    rule = {"name": "r", "select": {"rollout": tag}}
    base = placement_file(run_dir / f"{tag}-v1.yaml", [{**rule, "image": {"id": good["image_id"]}}])
    ok(run_edgepin(["apply", str(base)], cli_env))
    for node in two_nodes:
        ok(node.node("reconcile"))
        assert fleet_status(cli_env, node.name)[0]["outcome"] == "running"

    spec = {"name": tag, "canary": {"count": 1}, "deadline": "10m", "max_rejected": 0}
    f = placement_file(
        run_dir / f"{tag}-v2.yaml", [{**rule, "image": {"id": unpinned["image_id"]}}], rollout=spec
    )
    plan = ok(run_edgepin(["plan", str(f)], cli_env)).stdout
    assert "wave 1 canary: 1 nodes" in plan and "wave 2 rest: 1 nodes" in plan
    first = apply_json(cli_env, f, "--step")
    assert first["state"] == "waiting" and len(first["assigned"]) == 1
    canary = first["assigned"][0]["node"]
    other = next(n for n in two_nodes if n.name != canary)
    (node,) = [n for n in two_nodes if n.name == canary]
    # the canary has not reported yet: waiting, nothing more assigned
    again = apply_json(cli_env, f, "--step")
    assert again["state"] == "waiting" and again["assigned"] == []
    assert again["nodes"][canary]["verdict"] == "pending"
    r = node.node("reconcile")
    assert r.returncode == 8, r.stdout + r.stderr  # refused: not signed by a pinned cert
    halted = apply_json(cli_env, f, "--step", code=12)
    assert halted["state"] == "halted"
    assert halted["nodes"][canary]["verdict"] == "rejected"
    assert "pinned" in halted["nodes"][canary]["reason"], halted
    # without --step too: it halts by itself, and the rest of the fleet is untouched
    r = run_edgepin(["apply", str(f)], cli_env)
    assert r.returncode == 12 and "halted at wave canary" in r.stderr, r.stderr
    assert "rejected   " + canary in r.stdout, r.stdout
    assert fleet_status(cli_env, other.name)[0]["generation"] == 1

    # abort: the canary goes back to its previous image, at a higher generation
    aborted = apply_json(cli_env, f, "--abort")
    assert aborted["state"] == "aborted"
    assert [(a["node"], a["image_id"], a["generation"]) for a in aborted["assigned"]] == [
        (canary, good["image_id"], 3)
    ]
    ok(node.node("reconcile"))
    row = fleet_status(cli_env, canary)[0]
    assert (row["outcome"], row["running_image_id"], row["running_generation"]) == (
        "running",
        good["image_id"],
        3,
    ), row
    # an aborted rollout is not started again by mistake
    r = run_edgepin(["apply", str(f)], cli_env)
    assert r.returncode == 2 and "was aborted" in r.stderr, r.stderr
    assert apply_json(cli_env, f, "--abort")["assigned"] == []  # idempotent


def test_a_rollout_goes_wave_by_wave_halts_on_a_timeout_resumes_and_survives_ctrl_c(
    cli_env: dict[str, str],
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    run_dir: Path,
) -> None:
    """Paper nodes whose reports the test writes as their nodes would. Nothing here races
    the clock: the deadline is long while the test works, and is shortened in the file (as
    an operator may do; it is read at every run) to make the late node time out."""
    tag = f"w{secrets.token_hex(3)}"
    paper = make_fleet(admin, edge_domain(admin), 8, lambda i: {"fleet": tag, "site": f"s{i % 2}"})
    by_name = {p.name: p for p in paper}
    image = publish(version="1")
    path = run_dir / f"{tag}.yaml"
    rules = [{"name": "all", "select": {"fleet": tag}, "image": {"id": image["image_id"]}}]

    def with_deadline(deadline: str) -> Path:
        spec = {
            "name": tag,
            "canary": {"count": 2},
            "waves": [{"by": "site"}],
            "deadline": deadline,
            "max_timeouts": 0,
        }
        return placement_file(path, rules, rollout=spec)

    f = with_deadline("30m")

    def runs(names: list[str]) -> None:
        for n in names:
            ref = nodereport.Ref(image["image_id"], 1)
            text = report_text(n, State.RUNNING, running=ref, assignment=ref)
            write_report(admin, by_name[n], text)

    canary = [a["node"] for a in apply_json(cli_env, f, "--step")["assigned"]]
    assert len(canary) == 2
    runs(canary)
    second = apply_json(cli_env, f, "--step")
    assert second["nodes"][canary[0]]["verdict"] == "running"
    wave = [a["node"] for a in second["assigned"]]

    def site(n: str) -> str:
        return f"s{int(n[-5:]) % 2}"

    (first_site,) = {site(n) for n in wave}  # one wave per site
    assert set(wave) == {n for n in by_name if n not in canary and site(n) == first_site}
    # all but one report
    late = wave[-1]
    runs(wave[:-1])
    # waiting for the late node's report, it shows its progress; Ctrl-C loses nothing.
    # The command gets SIGINT's default disposition, as at a terminal: a suite started as
    # a background job of a non-interactive shell (CI) passes SIGINT on ignored, and a
    # command that inherits an ignored SIGINT rightly keeps ignoring it.
    proc = subprocess.Popen(
        [EDGEPIN, "apply", str(f), "--poll", "0.5"],
        env={**os.environ, **cli_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    shown = [proc.stderr.readline()]
    while shown[-1] and "1 pending" not in shown[-1]:
        shown.append(proc.stderr.readline())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, "".join(shown) + err)
    # the deadline shortened: the late node has timed out, which halts the rollout (none
    # allowed)
    time.sleep(1)
    with_deadline("1s")
    r = run_edgepin(["apply", str(f), "--poll", "0.5"], cli_env)
    assert r.returncode == 12, r.stdout + r.stderr
    assert f"timed-out  {late}" in r.stdout
    # --resume takes that wave as passed (it is halted: with the long deadline back, it
    # would be waiting for the late node) and starts the next one
    resumed = apply_json(cli_env, f, "--resume", "--step")
    with_deadline("30m")
    rest = [a["node"] for a in resumed["assigned"]]
    assert rest and set(rest) == set(by_name) - set(canary) - set(wave)
    runs(rest)
    done = apply_json(cli_env, f, "--poll", "0.5")
    assert done["state"] == "done" and done["assigned"] == []
    assert [w["verdicts"]["running"] for w in done["waves"]] == [2, len(wave) - 1, len(rest)]
    for p in paper:
        record = assignment_of(admin, p)
        assert record and record["generation"] == 1 and record["image_id"] == image["image_id"]
    # done is done: running it again changes nothing
    assert apply_json(cli_env, f, "--step")["state"] == "done"
