"""Reconcile: make the node run exactly its assigned, verified guest.

At every boot and on a timer: unseal the node credential, read the assignment, fetch and
verify a new image beside the running guest, switch, health-check, roll back when the new
guest is not healthy, and keep the guest running from the local copy when the control plane
cannot be reached. Every decision lands in the state file (atomically) and the status.
"""

from __future__ import annotations

import hashlib
import json
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
from provisioner.node import credentials, domain, fetch, keys, ledger, report, state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)


@dataclass
class Outcome:
    state: str
    reason: str
    error: EdgepinError | None = None


COUNTERS_NAME = "counters.json"
HASH_CHUNK = 1 << 20


def load_counters(cfg: NodeConfig) -> dict[str, Any]:
    """What changes at every run and decides nothing; a damaged file starts afresh."""
    try:
        raw = state.read_json(cfg.state_dir / COUNTERS_NAME) or {}
    except StateError:
        raw = {}
    counters: dict[str, Any] = {
        "bytes_fetched_total": 0,
        "failures": {},
        "reported": {},
        "last_success": None,
    }
    for key, default in list(counters.items()):
        value = raw.get(key)
        if isinstance(value, type(default)) or (default is None and isinstance(value, float)):
            counters[key] = value
    fetching = raw.get("fetching")
    if isinstance(fetching, str):
        counters["fetching"] = fetching
    return counters


def save(cfg: NodeConfig, anchor: ledger.Anchor, st: dict[str, Any]) -> None:
    """The ledger part through the TPM anchor (only when it changed), the rest plainly."""
    ledger.save(cfg.state_dir, anchor, {k: st[k] for k in ledger.KEYS})
    state.write_json(
        cfg.state_dir / COUNTERS_NAME, {k: v for k, v in st.items() if k not in ledger.KEYS}
    )


def _spec(cfg: NodeConfig, entry: dict[str, Any]) -> domain.GuestSpec:
    return domain.GuestSpec(
        image_id=entry["image_id"],
        generation=int(entry["generation"]),
        disk=cfg.images_dir / f"{entry['image_id']}.qcow2",
        vcpus=int(entry["vcpus"]),
        memory_mb=int(entry["memory_mb"]),
    )


def check_local_copy(cfg: NodeConfig, st: dict[str, Any], image_id: str) -> None:
    """The image on disk is byte for byte what was verified when it was fetched.

    Run before every start: the state partition can be written by whoever holds the disk,
    and what the ledger (anchored in the TPM) recorded is the only thing trusted.
    """
    known = st["images"].get(image_id)
    if known is None:
        raise VerificationError(f"image {image_id} has no verified record on this node")
    path = cfg.images_dir / f"{image_id}.qcow2"
    started = time.monotonic()
    digest = hashlib.sha512()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise VerificationError(f"image {image_id} is missing from {cfg.images_dir}") from None
    if size != known["size"] or digest.hexdigest() != known["sha512"]:
        raise VerificationError(
            f"image {image_id} on disk differs from what was verified at fetch time",
            image_id=image_id,
            expected=known["sha512"],
            got=digest.hexdigest(),
        )
    LOG.info(
        "reconcile: local copy of %s matches its verified sha512 (%d bytes, %.1f s)",
        image_id,
        size,
        time.monotonic() - started,
    )


def _forget_image(cfg: NodeConfig, st: dict[str, Any], image_id: str) -> None:
    """Drop a local copy that failed its check, so that the next run fetches it again."""
    (cfg.images_dir / f"{image_id}.qcow2").unlink(missing_ok=True)
    keys.forget(cfg, image_id)
    st["images"].pop(image_id, None)


def _start(cfg: NodeConfig, conn: Any, entry: dict[str, Any], st: dict[str, Any]) -> None:
    image_id = entry["image_id"]
    try:
        check_local_copy(cfg, st, image_id)
        passphrase = keys.unseal(cfg, image_id, st["images"][image_id].get("key_sha256"))
    except VerificationError as e:  # the local copy, not the TPM: fetch it again
        LOG.error("reconcile: refusing to start %s: %s", image_id, e.message)
        _forget_image(cfg, st, image_id)
        raise
    try:
        domain.start(cfg, conn, _spec(cfg, entry), passphrase)
    finally:
        del passphrase


def parse_assignment(raw: Any) -> dict[str, Any] | None:
    """The assignment record from Keystone: None, or a checked image id and generation."""
    if raw is None or raw == "":
        return None
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        raise ImageError("the assignment record is not JSON") from None
    if not isinstance(data, dict):
        raise ImageError("the assignment record is not an object")
    image_id, gen = data.get("image_id"), data.get("generation")
    if not isinstance(image_id, str) or not ledger.IMAGE_ID.fullmatch(image_id):
        raise ImageError("the assignment names no valid image id")
    if type(gen) is not int or not 0 <= gen <= ledger.MAX_GENERATION:
        raise ImageError("the assignment's generation is not a whole number in range")
    return {"image_id": image_id, "generation": gen}


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
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ServiceUnavailableError("keystone sent a malformed project record") from None
    return parse_assignment(raw)


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
    except (ValueError, TypeError):
        raise ImageError("edgepin_vcpus / edgepin_memory_mb are not numbers") from None
    if not (1 <= vcpus <= 512) or not (16 <= memory <= 4 * 1024 * 1024):
        raise ImageError(f"vCPUs {vcpus} or memory {memory} MiB out of range")
    marker = image.get("edgepin_health_marker")
    if marker is not None and (not isinstance(marker, str) or not marker.isprintable()):
        raise ImageError("edgepin_health_marker is not printable text")
    entry = {
        "image_id": image["id"],
        "generation": generation,
        "vcpus": vcpus,
        "memory_mb": memory,
        "health_marker": marker,
        # shown on consoles and in status: no control characters (terminal escapes)
        "version": "".join(c for c in str(image.get("edgepin_version", "")) if c.isprintable())[
            :64
        ],
    }
    try:  # what the ledger will accept when it is saved after the switch, checked before
        return ledger.check_entry(entry)
    except TrustError as e:
        raise ImageError(f"image {image['id']}: {e.message}") from None


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
        st = load_counters(cfg)
        anchor = ledger.TpmAnchor(cfg.tcti, cfg.pcrs)
        outcome = _reconcile(cfg, anchor, st)
        if outcome.state in ("running", "offline"):
            st["last_success"] = time.time()
        if outcome.error is not None:
            _fail(st, outcome.error.reason)
        if "enrollment" in st:  # the ledger was loaded and vouched for
            try:
                save(cfg, anchor, st)
            except EdgepinError as e:
                LOG.error("reconcile: cannot record the state: %s", e.message)
                outcome = Outcome("failed", e.message, e)
        else:
            state.write_json(cfg.state_dir / COUNTERS_NAME, st)
        current = st.get("current") or {}
        report.write_status(
            cfg,
            {
                "state": outcome.state,
                "reason": outcome.reason,
                "image_id": current.get("image_id"),
                "generation": current.get("generation"),
                "version": current.get("version"),
                "highest_generation": st.get("highest_generation"),
                "previous_image_id": (st.get("previous") or {}).get("image_id"),
                "last_success": st["last_success"],
                "bytes_fetched_total": st["bytes_fetched_total"],
                "failures": st["failures"],
                "error": outcome.error.reason if outcome.error else None,
            },
        )
        return outcome


def _reconcile(cfg: NodeConfig, anchor: ledger.Anchor, st: dict[str, Any]) -> Outcome:
    if cfg.disabled_path.exists():
        return Outcome("disabled", f"{cfg.disabled_path} exists")
    if not credentials.enrolled(cfg):
        err = StateError("the node is not enrolled", hint="run `edgepin node enroll`")
        return Outcome("unenrolled", err.message, err)
    try:
        st.update(ledger.load(cfg.state_dir, anchor))
        ident, sess = credentials.node_session(cfg, st["enrollment"])
    except TrustError as e:
        LOG.error("reconcile: %s", e.message)
        return Outcome("refused", e.message, e)
    try:
        conn = domain.connect(cfg)
    except GuestError as e:  # libvirtd down: nothing to start the guest with
        LOG.error("reconcile: %s", e.message)
        return Outcome("failed", e.message, e)
    try:
        domain.remove_others(cfg, conn)
        return _converge(cfg, anchor, st, ident, sess, conn)
    except GuestError as e:  # a foreign domain libvirt cannot remove
        LOG.error("reconcile: %s", e.message)
        return Outcome("failed", e.message, e)
    finally:
        conn.close()


def _converge(
    cfg: NodeConfig,
    anchor: ledger.Anchor,
    st: dict[str, Any],
    ident: credentials.Identity,
    sess: Any,
    conn: Any,
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
        elif (
            current is None
            or current["image_id"] != assignment["image_id"]
            or assignment["image_id"] not in st["images"]  # its local copy failed a check
        ):
            st["highest_generation"] = gen
            refusal = _update(cfg, anchor, st, ident, sess, conn, assignment)
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
            _start(cfg, conn, current, st)
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
    anchor: ledger.Anchor,
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
            save(cfg, anchor, st)
            try:
                result = fetch.fetch(sess, ident.interface, image, cert, cfg.images_dir)
            finally:
                st.pop("fetching", None)
            st["bytes_fetched_total"] += result.bytes_fetched
            st["images"][image_id] = {
                "sha512": result.sha512,
                "size": result.size,
                "key_sha256": None,
            }
            save(cfg, anchor, st)
        known = st["images"][image_id]
        known["key_sha256"] = keys.ensure_sealed(
            cfg, sess, ident.interface, image, known.get("key_sha256")
        )
        save(cfg, anchor, st)
    except (VerificationError, ImageError, NotFoundError, GuestError) as e:
        LOG.error("reconcile: image %s refused: %s", image_id, e.message)
        if report.member_status(sess, ident.interface, image_id, ident.project_id, "rejected"):
            st["reported"][image_id] = "rejected"
        return Outcome("refused", e.message, e)
    except (ServiceUnavailableError, AuthError, StateError, TrustError) as e:
        LOG.error("reconcile: update to %s not possible now: %s", image_id, e.message)
        return Outcome("offline" if st["current"] else "failed", e.message, e)

    old = st["current"]
    if old is not None and old["image_id"] == image_id:  # the same image, fetched again
        old = st["previous"]
    try:
        _start(cfg, conn, entry, st)
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
            _start(cfg, conn, old, st)
        except EdgepinError as e:
            return Outcome("failed", f"{err.message}; rollback failed: {e.message}", e)
        return Outcome("rolled-back", err.message, err)
    domain.stop(cfg, conn)
    return Outcome("failed", err.message, err)
