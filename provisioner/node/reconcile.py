"""Reconcile: make the node run exactly its assigned, verified guest.

At every boot and on a timer: unseal the node credential, read the assignment, fetch and
verify a new image beside the running guest, switch, health-check, roll back when the new
guest is not healthy, and keep the guest running from the local copy when the control plane
cannot be reached. Every decision lands in the state file (atomically) and the status.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from keystoneauth1 import exceptions as ksa_exc

from provisioner.cloud import translate
from provisioner.errors import (
    AuthError,
    EdgepinError,
    GuestError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    StateError,
    TrustError,
    VerificationError,
)
from provisioner.node import credentials, domain, fetch, keys, report, state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)


@dataclass
class Outcome:
    state: str
    reason: str
    error: EdgepinError | None = None


def _state_path(cfg: NodeConfig) -> Any:
    return cfg.state_dir / "node.json"


def load_state(cfg: NodeConfig) -> dict[str, Any]:
    st = state.read_json(_state_path(cfg)) or {}
    st.setdefault("highest_generation", 0)
    st.setdefault("current", None)
    st.setdefault("previous", None)
    st.setdefault("images", {})
    st.setdefault("bytes_fetched_total", 0)
    st.setdefault("failures", {})
    st.setdefault("reported", {})
    st.setdefault("last_success", None)
    st.setdefault("rejected", {})
    return st


def _spec(cfg: NodeConfig, entry: dict[str, Any]) -> domain.GuestSpec:
    return domain.GuestSpec(
        image_id=entry["image_id"],
        generation=int(entry["generation"]),
        disk=cfg.images_dir / f"{entry['image_id']}.qcow2",
        vcpus=int(entry["vcpus"]),
        memory_mb=int(entry["memory_mb"]),
    )


def _start(cfg: NodeConfig, conn: Any, entry: dict[str, Any]) -> None:
    passphrase = keys.unseal(cfg, entry["image_id"])
    try:
        domain.start(cfg, conn, _spec(cfg, entry), passphrase)
    finally:
        del passphrase


def _read_assignment(sess: Any, ident: credentials.Identity) -> dict[str, Any] | None:
    try:
        r = sess.get(f"{ident.auth_url}/projects/{ident.project_id}", raise_exc=False)
    except (ksa_exc.Unauthorized, ksa_exc.NotFound):
        # raised while authenticating: the application credential is gone or disabled
        raise AuthError("keystone refused the node credential (revoked?)") from None
    except ksa_exc.ClientException as e:
        raise ServiceUnavailableError(f"control plane unreachable ({type(e).__name__})") from None
    if r.status_code in (401, 403):
        raise AuthError(f"keystone refused the node credential ({r.status_code}); revoked?")
    if r.status_code >= 500:
        raise ServiceUnavailableError(f"keystone: server error {r.status_code}")
    r.raise_for_status()
    try:
        raw = r.json()["project"].get("edgepin_assignment")
    except (ValueError, KeyError, AttributeError):
        raise ServiceUnavailableError("keystone sent a malformed project record") from None
    if not raw:
        return None
    import json

    try:
        data: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
        int(data["generation"])
        str(data["image_id"])
    except (ValueError, KeyError, TypeError):
        raise ImageError("the assignment record is malformed") from None
    return data


def _get_image(sess: Any, ident: credentials.Identity, image_id: str) -> dict[str, Any]:
    with translate("glance", f"image {image_id}"):
        r = sess.get(
            f"/v2/images/{image_id}",
            endpoint_filter={"service_type": "image", "interface": ident.interface},
            raise_exc=False,
        )
    if r.status_code == 404:
        raise ImageError(f"assigned image {image_id} does not exist or is not shared with us")
    if r.status_code in (401, 403):
        raise AuthError(f"glance refused access to image {image_id}")
    if r.status_code >= 500:
        raise ServiceUnavailableError(f"glance: server error {r.status_code}")
    r.raise_for_status()
    try:
        image: dict[str, Any] = r.json()
    except ValueError:
        raise ImageError(f"glance sent malformed metadata for image {image_id}") from None
    if not isinstance(image, dict) or image.get("id") != image_id:
        raise ImageError(f"glance sent metadata of another image than {image_id}")
    return image


def _entry(image: dict[str, Any], generation: int) -> dict[str, Any]:
    try:
        vcpus = int(image.get("edgepin_vcpus", "1"))
        memory = int(image.get("edgepin_memory_mb", "256"))
    except ValueError:
        raise ImageError("edgepin_vcpus / edgepin_memory_mb are not numbers") from None
    if not (1 <= vcpus <= 512) or not (16 <= memory <= 4 * 1024 * 1024):
        raise ImageError(f"vCPUs {vcpus} or memory {memory} MiB out of range")
    marker = image.get("edgepin_health_marker")
    if marker is not None and (not isinstance(marker, str) or not marker.isprintable()):
        raise ImageError("edgepin_health_marker is not printable text")
    return {
        "image_id": image["id"],
        "generation": generation,
        "vcpus": vcpus,
        "memory_mb": memory,
        "health_marker": marker,
        "version": str(image.get("edgepin_version", ""))[:64],
    }


def _prune(cfg: NodeConfig, st: dict[str, Any]) -> None:
    keep = {e["image_id"] for e in (st["current"], st["previous"]) if e}
    for path in cfg.images_dir.glob("*.qcow2"):
        image_id = path.name.removesuffix(".qcow2")
        if image_id not in keep:
            path.unlink(missing_ok=True)
            keys.forget(cfg, image_id)
            st["images"].pop(image_id, None)
            LOG.info("reconcile: removed old image %s", image_id)
    for path in cfg.images_dir.glob("*.partial"):
        if path.name.removesuffix(".partial") not in keep and st.get("fetching") != path.name:
            path.unlink(missing_ok=True)


def _fail(st: dict[str, Any], kind: str) -> None:
    st["failures"][kind] = int(st["failures"].get(kind, 0)) + 1


def reconcile(cfg: NodeConfig) -> Outcome:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.node_lock(cfg.lock_path):
        state.remove_stale_temp_files(cfg.state_dir)
        st = load_state(cfg)
        outcome = _reconcile(cfg, st)
        if outcome.state in ("running", "offline"):
            st["last_success"] = time.time()
        if outcome.error is not None:
            _fail(st, outcome.error.reason)
        state.write_json(_state_path(cfg), st)
        current = st["current"] or {}
        report.write_status(
            cfg,
            {
                "state": outcome.state,
                "reason": outcome.reason,
                "image_id": current.get("image_id"),
                "generation": current.get("generation"),
                "version": current.get("version"),
                "highest_generation": st["highest_generation"],
                "previous_image_id": (st["previous"] or {}).get("image_id"),
                "last_success": st["last_success"],
                "bytes_fetched_total": st["bytes_fetched_total"],
                "failures": st["failures"],
                "error": outcome.error.reason if outcome.error else None,
            },
        )
        return outcome


def _reconcile(cfg: NodeConfig, st: dict[str, Any]) -> Outcome:
    if cfg.disabled_path.exists():
        return Outcome("disabled", f"{cfg.disabled_path} exists")
    if not credentials.enrolled(cfg):
        err = StateError("the node is not enrolled", hint="run `edgepin node enroll`")
        return Outcome("unenrolled", err.message, err)
    try:
        ident, sess = credentials.node_session(cfg)
    except TrustError as e:
        LOG.error("reconcile: %s", e.message)
        return Outcome("refused", e.message, e)
    conn = domain.connect(cfg)
    try:
        domain.remove_others(cfg, conn)
        return _converge(cfg, st, ident, sess, conn)
    finally:
        conn.close()


def _converge(
    cfg: NodeConfig, st: dict[str, Any], ident: credentials.Identity, sess: Any, conn: Any
) -> Outcome:
    offline_reason = None
    offline_error: EdgepinError | None = None
    assignment = None
    try:
        assignment = _read_assignment(sess, ident)
    except (ServiceUnavailableError, AuthError) as e:
        offline_reason, offline_error = e.message, e

    refusal: Outcome | None = None
    if assignment is not None:
        gen = int(assignment["generation"])
        current = st["current"]
        err: EdgepinError
        if gen < int(st["highest_generation"]):
            err = StateError(
                f"assignment generation {gen} is lower than {st['highest_generation']} already "
                "seen: refused as a rollback attack"
            )
            LOG.error("reconcile: %s", err.message)
            refusal = Outcome("refused", err.message, err)
        elif st["rejected"].get(assignment["image_id"]) == gen:
            st["highest_generation"] = gen
            err = ImageError(
                f"image {assignment['image_id']} (generation {gen}) was already refused; "
                "waiting for a new assignment"
            )
            refusal = Outcome("refused", err.message, err)
        elif current is None or current["image_id"] != assignment["image_id"]:
            st["highest_generation"] = gen
            refusal = _update(cfg, st, ident, sess, conn, assignment)
            if refusal and refusal.state in ("refused", "rolled-back"):
                st["rejected"][assignment["image_id"]] = gen
            if refusal and refusal.state == "rolled-back":
                return refusal
        else:
            st["highest_generation"] = gen
            current["generation"] = gen

    # make sure the current guest runs: at boot, offline, after a libvirtd restart
    current = st["current"]
    if current is None:
        if refusal:
            return refusal
        if offline_error is not None:
            none_yet = type(offline_error)(f"no guest yet: {offline_reason}")
            return Outcome("offline", none_yet.message, none_yet)
        return Outcome("waiting", "no assignment yet")
    if not domain.running(cfg, conn, current["image_id"]):
        try:
            _start(cfg, conn, current)
            ok, why = domain.healthy(cfg, conn, current["image_id"], None, 10.0)
        except EdgepinError as e:
            return Outcome("failed", e.message, e)
        if not ok:
            down = GuestError(f"the guest did not stay up: {why}")
            return Outcome("failed", down.message, down)
        LOG.info("reconcile: guest %s started from the local copy", current["image_id"])
    if refusal:
        return refusal
    if st["reported"].get(current["image_id"]) != "accepted" and offline_reason is None:
        if report.member_status(
            sess, ident.interface, current["image_id"], ident.project_id, "accepted"
        ):
            st["reported"][current["image_id"]] = "accepted"
    if offline_reason:
        return Outcome("offline", f"guest running from the local copy; {offline_reason}")
    LOG.info("reconcile passed")
    return Outcome("running", f"guest {current['image_id']} running")


def _update(
    cfg: NodeConfig,
    st: dict[str, Any],
    ident: credentials.Identity,
    sess: Any,
    conn: Any,
    assignment: dict[str, Any],
) -> Outcome | None:
    """Fetch, verify and switch to the assigned image. None when the switch succeeded."""
    image_id = str(assignment["image_id"])
    gen = int(assignment["generation"])
    try:
        image = _get_image(sess, ident, image_id)
        fetch.check_properties(image)
        entry = _entry(image, gen)
        domain.check_fits(cfg, conn, entry["vcpus"], entry["memory_mb"])
        disk = cfg.images_dir / f"{image_id}.qcow2"
        known = st["images"].get(image_id)
        if not (disk.exists() and known and known.get("sha512") == image["os_hash_value"]):
            cert = fetch.choose_certificate(
                image,
                fetch.load_pinned(cfg.pinned_certs_dir),
                lambda sid: keys.barbican_payload(sess, ident.interface, sid, text=False),
            )
            st["fetching"] = f"{image_id}.partial"
            state.write_json(_state_path(cfg), st)
            try:
                result = fetch.fetch(sess, ident.interface, image, cert, cfg.images_dir)
            finally:
                st.pop("fetching", None)
            st["bytes_fetched_total"] += result.bytes_fetched
            st["images"][image_id] = {"sha512": result.sha512, "size": result.size}
            state.write_json(_state_path(cfg), st)
        keys.ensure_sealed(cfg, sess, ident.interface, image)
    except (VerificationError, ImageError, NotFoundError, GuestError) as e:
        LOG.error("reconcile: image %s refused: %s", image_id, e.message)
        if report.member_status(sess, ident.interface, image_id, ident.project_id, "rejected"):
            st["reported"][image_id] = "rejected"
        return Outcome("refused", e.message, e)
    except (ServiceUnavailableError, AuthError, StateError) as e:
        LOG.error("reconcile: update to %s not possible now: %s", image_id, e.message)
        return Outcome("offline" if st["current"] else "failed", e.message, e)

    old = st["current"]
    try:
        _start(cfg, conn, entry)
        ok, why = domain.healthy(cfg, conn, image_id, entry["health_marker"], cfg.health_timeout)
    except EdgepinError as e:
        ok, why = False, e.message
    if ok:
        st["previous"], st["current"] = old, entry
        st["reported"][image_id] = (
            "accepted"
            if report.member_status(sess, ident.interface, image_id, ident.project_id, "accepted")
            else None
        )
        _prune(cfg, st)
        LOG.info("reconcile: switched to image %s (generation %d): %s", image_id, gen, why)
        return None
    LOG.error("reconcile: new guest %s not healthy (%s); rolling back", image_id, why)
    if report.member_status(sess, ident.interface, image_id, ident.project_id, "rejected"):
        st["reported"][image_id] = "rejected"
    err = GuestError(f"new guest {image_id} not healthy: {why}; rolled back")
    if old is not None:
        try:
            _start(cfg, conn, old)
        except EdgepinError as e:
            return Outcome("failed", f"{err.message}; rollback failed: {e.message}", e)
        return Outcome("rolled-back", err.message, err)
    domain.stop(cfg, conn)
    return Outcome("failed", err.message, err)
