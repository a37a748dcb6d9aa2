"""Reconcile: make the node run exactly its assigned, verified guest.

At every boot and on a timer: load the anchored ledger, unseal the node credential, read
the assignment, ask :func:`provisioner.node.decide.decide` what to do, and do it: fetch
and verify a new image beside the running guest, switch, health-check, roll back when the
new guest is not healthy, keep the guest running from the local copy when the control
plane cannot be reached, destroy the keys once Keystone has refused the node for longer
than the revoke grace period. Every run ends in one :class:`State`, recorded in the ledger
(through the TPM anchor), the counters and the status.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from provisioner import nodereport
from provisioner.errors import (
    AuthError,
    DigestMismatch,
    EdgepinError,
    GuestError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    StateError,
    TrustError,
    VerificationError,
)
from provisioner.node import (
    credentials,
    domain,
    facts,
    fetch,
    hostfetch,
    hostslot,
    keys,
    ledger,
    policy,
    report,
    state,
    token,
)
from provisioner.node.client import NodeClient
from provisioner.node.config import NodeConfig
from provisioner.node.decide import Observed, Plan, Step, back_off, decide, quiet
from provisioner.node.model import (
    Assignment,
    Counters,
    Guest,
    ImageRecord,
    Ledger,
    MemberStatus,
    State,
    Status,
    assigned_guest,
    report_image_of,
)

LOG = logging.getLogger(__name__)

COUNTERS_NAME = "counters.json"


@dataclass(frozen=True)
class Outcome:
    state: State
    reason: str
    error: EdgepinError | None = None


def load_counters(cfg: NodeConfig) -> Counters:
    """What changes at every run and decides nothing; a damaged file starts afresh."""
    try:
        raw = state.read_json(cfg.state_dir / COUNTERS_NAME)
    except StateError:
        raw = None
    return Counters.from_dict(raw)


def check_local_copy(cfg: NodeConfig, known: ImageRecord | None, image_id: str) -> None:
    """The image on disk is byte for byte what was verified when it was fetched.

    Run before every start: the state partition can be written by whoever holds the disk,
    and what the ledger (anchored in the TPM) recorded is the only thing trusted.
    """
    if known is None:
        raise DigestMismatch("the local copy", image_id, None, None)
    path = cfg.images_dir / f"{image_id}.qcow2"
    started = time.monotonic()
    digest = hashlib.sha512()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(fetch.CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise DigestMismatch("the local copy", image_id, known.sha512, None) from None
    if size != known.size or digest.hexdigest() != known.sha512:
        raise DigestMismatch("the local copy", image_id, known.sha512, digest.hexdigest())
    LOG.info(
        "reconcile: local copy of %s matches its verified sha512 (%d bytes, %.1f s)",
        image_id,
        size,
        time.monotonic() - started,
    )


def _status(outcome: Outcome, ledger_: Ledger | None, counters: Counters) -> Status:
    current = ledger_.current if ledger_ else None
    previous = ledger_.previous if ledger_ else None
    error = outcome.error
    return Status(
        state=outcome.state,
        reason=outcome.reason,
        image_id=current.image_id if current else None,
        generation=current.generation if current else None,
        version=current.version if current else None,
        highest_generation=ledger_.highest_generation if ledger_ else None,
        previous_image_id=previous.image_id if previous else None,
        last_success=counters.last_success,
        bytes_fetched_total=counters.bytes_fetched_total,
        failures=dict(counters.failures),
        error=str(error.reason) if error else None,
        details=_details(error),
    )


def _details(error: EdgepinError | None) -> dict[str, Any]:
    """An error's facts for the status: plain values only (ids, digests, numbers)."""
    if error is None:
        return {}
    return {
        k: v if isinstance(v, int | str | bool) or v is None else str(v)
        for k, v in sorted(error.fields.items())
    }


def reconcile(cfg: NodeConfig) -> Outcome:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.node_lock(cfg.lock_path):
        state.remove_stale_temp_files(cfg.state_dir)
        run = Run(cfg, ledger.TpmAnchor(cfg.tcti, policy.node_policy(cfg)), load_counters(cfg))
        return _finish(run, run.go, "reconcile")


IMPORT_LOCK_WAIT = 1800.0
"""Seconds an import waits for a reconcile that holds the node lock (a download, a switch)."""


def import_bundle(cfg: NodeConfig, path: Path) -> Outcome:
    """Run the assignment an air-gapped bundle in ``path`` carries, as a reconcile runs the
    one it reads from Keystone: the same checks, the same ledger and generation floor, the
    same switch with health check and rollback. Nothing here talks to the control plane;
    the next reconcile that reaches it reports the guest that runs."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.node_lock(cfg.lock_path, timeout=IMPORT_LOCK_WAIT):
        state.remove_stale_temp_files(cfg.state_dir)
        run = Run(cfg, ledger.TpmAnchor(cfg.tcti, policy.node_policy(cfg)), load_counters(cfg))
        return _finish(run, lambda: run.go_import(path), "import")


def _finish(run: Run, body: Callable[[], Outcome], where: str) -> Outcome:
    """Run ``body`` and record what it ended in: the ledger, the counters, the status."""
    cfg = run.cfg
    try:
        outcome = body()
    except Exception as e:
        # a bug, not an input (inputs end in an EdgepinError): leave a status that says
        # so, then fail loudly with the traceback in the journal
        bug = EdgepinError(f"internal error: {type(e).__name__}", where=where)
        report.write_status(
            cfg, _status(Outcome(State.FAILED, bug.message, bug), None, run.counters)
        )
        raise
    counters = run.counters
    if outcome.state in (State.RUNNING, State.OFFLINE):
        counters.last_success = time.time()
    # healthy: the TPM opened the node's state, and the guest it should run runs (or none
    # is assigned yet)
    _settle_host(run, healthy=outcome.state in (State.RUNNING, State.OFFLINE, State.WAITING))
    host = _host_release(run) if outcome.state in (State.RUNNING, State.WAITING) else None
    if outcome.error is not None:
        kind = str(outcome.error.reason)
        counters.failures[kind] = counters.failures.get(kind, 0) + 1
    if run.client is not None and not run.paused:
        counters.quiet_until, counters.busy_streak = back_off(
            counters.busy_streak,
            outcome.error,
            time.time(),
            random.random(),  # noqa: S311
        )
    run.report(outcome)
    try:
        run.save()
    except EdgepinError as e:
        LOG.error("%s: cannot record the state: %s", where, e.message)
        outcome = Outcome(State.FAILED, e.message, e)
    report.write_status(cfg, _status(outcome, run.ledger, counters))
    if host is not None and host.restart:
        hostslot.restart(cfg)  # last: everything this run did is recorded
    return outcome


def _host_release(run: Run) -> hostfetch.HostStep | None:
    """The node's host assignment, once the node is healthy and has read its project in
    this run: fetch, check and write the assigned host release into the other root slot
    (provisioner.node.hostfetch); what came of it goes into this run's report."""
    if not run.reached or run.project is None or run.ledger is None or run.client is None:
        return None
    enrollment = run.ledger.enrollment
    try:
        pins = fetch.assignment_pins(run.cfg.assignment_certs_dir, run.cfg.pinned_certs_dir)
        done = hostfetch.step(
            run.cfg,
            run.client,
            run.project,
            pins,
            (enrollment.project_id, enrollment.node_id),
        )
    except EdgepinError as e:
        LOG.error("host: %s", e.message)
        done = hostfetch.HostStep(refused=e.message)
    if run.facts is not None:
        # the slots as they are now (an update written in this run is armed), and why
        # the assigned release is refused as this run found it
        found = {
            **facts.host_slot_facts(run.cfg),
            "host_refused": nodereport.clean_text(done.refused, nodereport.MAX_REASON),
        }
        run.facts = replace(run.facts, **found)
    return done


def _settle_host(run: Run, healthy: bool) -> None:
    """Commit the root slot this boot is on trial in once the node is healthy on it (its
    keys opened, its guest running or none assigned), note an update it came back from,
    and raise the TPM's host floor to a kept release's epoch; each goes into this run's
    report."""
    try:
        said = hostslot.settle(run.cfg, healthy)
    except EdgepinError as e:
        LOG.warning("host: the root slots cannot be read: %s", e.message)
        return
    # healthy and settled, the boot is kept (committed now or before, or no root slots):
    # no release below it opens again. The facts read the floor this run; the TPM is asked
    # again only when it is below this release's epoch.
    below = run.facts is None or run.facts.host_floor < run.cfg.host_epoch
    if healthy and below:
        try:
            if policy.raise_floor(run.cfg) is not None and run.facts is not None:
                run.facts = replace(run.facts, host_floor=run.cfg.host_epoch)
        except EdgepinError as e:
            LOG.error("%s", e.message)
    if said is not None and run.facts is not None:
        run.facts = replace(run.facts, **facts.host_slot_facts(run.cfg))


class ImageSource(Protocol):
    """Where an assigned image, its properties and its key come from: Glance and Barbican
    (:class:`Online`), or an air-gapped bundle (:class:`provisioner.node.media.Carried`).
    What is done with them is the same (:meth:`Run.stage`)."""

    resumable: bool  # a cut transfer is resumed at the next run (counters.fetching)

    def image(self, image_id: str) -> dict[str, Any]: ...

    def certificate(self, secret_id: str) -> bytes: ...

    def fetch(
        self, image: dict[str, Any], certificate: x509.Certificate, images_dir: Path
    ) -> fetch.FetchResult: ...

    def seal_key(self, cfg: NodeConfig, image: dict[str, Any], known: str | None) -> str: ...


class Online:
    """Glance and Barbican, through the node's one client."""

    resumable = True

    def __init__(self, client: NodeClient) -> None:
        self.client = client

    def image(self, image_id: str) -> dict[str, Any]:
        return self.client.image(image_id)

    def certificate(self, secret_id: str) -> bytes:
        return self.client.secret(secret_id, text=False)

    def fetch(
        self, image: dict[str, Any], certificate: x509.Certificate, images_dir: Path
    ) -> fetch.FetchResult:
        return fetch.fetch(self.client, image, certificate, images_dir)

    def seal_key(self, cfg: NodeConfig, image: dict[str, Any], known: str | None) -> str:
        return keys.ensure_sealed(cfg, self.client, image, known)


class Run:
    """One reconcile: the ledger and counters it changes, and the steps that change them."""

    def __init__(self, cfg: NodeConfig, anchor: ledger.Anchor, counters: Counters) -> None:
        self.cfg = cfg
        self.anchor = anchor
        self.counters = counters
        self.ledger: Ledger | None = None  # set once the TPM vouched for it
        self.client: NodeClient | None = None
        self.conn: Any = None
        self.paused = False  # the control plane was busy: this run asked it nothing
        self.doing = "reconcile"  # or "import": what the log lines say
        self.reached = False  # Keystone answered with the node's project
        self.report_image: str | None = None  # where the node's report goes
        self.facts: nodereport.Facts | None = None
        self.project: dict[str, Any] | None = None  # the node's project, as read in this run

    # ------------------------------------------------------------------ records
    def save(self) -> None:
        """The ledger through the TPM anchor (only when it changed), the counters plainly."""
        if self.ledger is not None:
            ledger.save(self.cfg.state_dir, self.anchor, self.ledger)
        state.write_json(self.cfg.state_dir / COUNTERS_NAME, self.counters.as_dict())

    def _ledger(self) -> Ledger:
        assert self.ledger is not None
        return self.ledger

    def _client(self) -> NodeClient:
        assert self.client is not None
        return self.client

    def _report(self, image_id: str, status: MemberStatus) -> None:
        if self.client is None:
            return  # an import: the next reconcile that reaches the control plane reports
        if self._client().set_member_status(image_id, status):
            self.counters.reported[image_id] = status
        else:
            self.counters.reported.pop(image_id, None)

    def report(self, outcome: Outcome) -> None:
        """Write the node's report (facts, this run's outcome) to its report image when it
        differs from the last one written or is due again; only after Keystone answered in
        this run, so that a node cut off or paused asks nothing more."""
        led = self.ledger
        if not self.reached or self.report_image is None or led is None:
            return
        current = led.current
        seen = led.floor_image_id
        rep = nodereport.NodeReport(
            node=led.enrollment.node_id,
            reported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            state=outcome.state,
            reason=nodereport.clean_text(outcome.reason, nodereport.MAX_REASON),
            error=outcome.error.reason if outcome.error else None,
            assignment=nodereport.Ref(seen, led.highest_generation) if seen else None,
            running=nodereport.Ref(current.image_id, current.generation) if current else None,
            running_version=current.version if current else "",
            facts=self.facts,
        )
        now = time.time()
        counters = self.counters
        if not nodereport.due(
            rep, counters.report_digest, counters.report_sent_at, now, self.cfg.report_interval
        ):
            return
        if self._client().write_report(self.report_image, rep.text()):
            counters.report_digest, counters.report_sent_at = nodereport.digest(rep), now
            LOG.info("reconcile: report written (%s)", outcome.state)

    # ------------------------------------------------------------------ the run
    def go(self) -> Outcome:
        cfg = self.cfg
        if cfg.disabled_path.exists():
            return Outcome(State.DISABLED, f"{cfg.disabled_path} exists")
        if not credentials.enrolled(cfg):
            err = StateError("the node is not enrolled", hint="run `edgepin node enroll`")
            return Outcome(State.UNENROLLED, err.message, err)
        try:
            self.ledger = ledger.load(cfg.state_dir, self.anchor)
            ident, sess = credentials.node_session(cfg, self.ledger.enrollment)
        except TrustError as e:
            LOG.error("reconcile: %s", e.message)
            return Outcome(State.REFUSED, e.message, e)
        self.client = NodeClient(sess, ident)
        try:
            return self._with_libvirt(self._converge)
        finally:
            token.keep(
                cfg.run_dir, sess.auth, self._ledger().enrollment.credential_id, ident.auth_url
            )

    def go_import(self, path: Path) -> Outcome:
        """The assignment an air-gapped bundle carries, through the online run's steps:
        the anchored ledger and the measured state first, the signed assignment with the
        pinned certificates, :func:`decide` (the generation floor), :meth:`stage` and
        :meth:`switch`. A refusal changes nothing: no guest is touched, no image and no
        refusal are recorded (the medium's damage is no verdict on the assignment), only
        the status says why. Nothing is sent to the control plane."""
        from provisioner import assignment as signed
        from provisioner.node import media

        cfg = self.cfg
        self.doing = "import"
        if cfg.disabled_path.exists():
            return Outcome(State.DISABLED, f"{cfg.disabled_path} exists")
        if not credentials.enrolled(cfg):
            err = StateError(
                "the node is not enrolled: a bundle runs only on an enrolled node",
                hint="enroll the node first (its seed, at its first boot)",
            )
            return Outcome(State.UNENROLLED, err.message, err)
        try:
            self.ledger = ledger.load(cfg.state_dir, self.anchor)
            # the checks of a reconcile's first step (the CA and credential blob of the
            # enrollment, the measured state: the TPM unseals the node credential); the
            # session is not used, an import asks the control plane nothing
            credentials.node_session(cfg, self.ledger.enrollment)
        except TrustError as e:
            LOG.error("import: %s", e.message)
            return Outcome(State.REFUSED, e.message, e)
        enrollment = self._ledger().enrollment
        try:
            if self.counters.refused_since is not None:
                since = time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.counters.refused_since)
                )
                raise AuthError(
                    f"keystone has refused this node's credential since {since}: a node "
                    "that is being revoked takes no bundle",
                    hint="a node that Keystone accepts again (one successful reconcile) "
                    "takes bundles again",
                    refused_since=since,
                )
            carried = media.Carried.read(path, enrollment.node_id)
            pins = fetch.assignment_pins(cfg.assignment_certs_dir, cfg.pinned_certs_dir)
            assigned = signed.verify(
                carried.manifest.assignment, pins, enrollment.project_id, enrollment.node_id
            )
            if assigned is None:  # pragma: no cover: the manifest's parser wants an object
                raise ImageError("the bundle carries no assignment")
        except EdgepinError as e:
            LOG.error("import: bundle refused: %s", e.message)
            return Outcome(State.REFUSED, e.message, e)
        LOG.info(
            "import: bundle %s: image %s, generation %d, signed for this node",
            carried.folder,
            assigned.image_id,
            assigned.generation,
        )
        plan = decide(
            self._ledger(), None, Observed(time.time(), assignment=assigned), cfg.revoke_grace
        )
        if plan.refusal is not None:
            LOG.error("import: %s", plan.refusal.message)
            return Outcome(State.REFUSED, plan.refusal.message, plan.refusal)
        return self._with_libvirt(lambda: self._converge_import(plan, assigned, carried))

    def _converge_import(self, plan: Plan, assigned: Assignment, source: ImageSource) -> Outcome:
        if plan.step is Step.KEEP:
            self.ledger = plan.ledger
            kept = self.keep_running(plan, None)
            if kept.state is not State.RUNNING:
                return kept
            return Outcome(
                State.RUNNING,
                f"nothing to import: the node runs image {assigned.image_id} at generation "
                f"{assigned.generation} already",
            )
        before = self._ledger()
        self.ledger = plan.ledger  # the floor, as online: what stage records is saved with it
        staged = self.stage(assigned, source)
        if isinstance(staged, Outcome):
            if self._ledger().images == before.images:
                self.ledger = before  # nothing verified: the refusal changes nothing
            else:  # the image verified and is kept (its key did not): a new bundle brings it
                LOG.info("import: image %s verified and kept", assigned.image_id)
            LOG.error("import: bundle refused: %s", staged.reason)
            return Outcome(State.REFUSED, staged.reason, staged.error)
        switched = self.switch(staged)
        if switched is not None and switched.state is State.ROLLED_BACK:
            self._reject(assigned)  # the guest was not healthy: a verdict, as online
        if switched is not None:
            return switched
        LOG.info("import passed")
        return Outcome(
            State.RUNNING,
            f"guest {assigned.image_id} running (generation {assigned.generation}, from "
            "a bundle; reported at the next reconcile that reaches the control plane)",
        )

    def _with_libvirt(self, body: Callable[[], Outcome]) -> Outcome:
        cfg = self.cfg
        try:
            self.conn = domain.connect(cfg)
        except GuestError as e:  # libvirtd down: nothing to start the guest with
            LOG.error("%s: %s", self.doing, e.message)
            return Outcome(State.FAILED, e.message, e)
        try:
            domain.remove_others(cfg, self.conn)
            return body()
        except GuestError as e:  # a foreign domain libvirt cannot remove
            LOG.error("%s: %s", self.doing, e.message)
            return Outcome(State.FAILED, e.message, e)
        finally:
            self.facts = facts.gather(cfg, self.conn, list(self._ledger().images))
            self.conn.close()

    def observe(self) -> Observed:
        now = time.time()
        if quiet(self.counters.quiet_until, now):
            self.paused = True
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.counters.quiet_until))
            pause = ServiceUnavailableError(
                f"the control plane was busy; the node asks it nothing before {until}",
                quiet_until=until,
            )
            return Observed(now, problem=pause)
        try:
            pins = fetch.assignment_pins(self.cfg.assignment_certs_dir, self.cfg.pinned_certs_dir)
            client = self._client()
            project = client.project()
            self.project = project
            self.reached = True
            self.report_image = report_image_of(project)
            return Observed(time.time(), assignment=client.verified_assignment(project, pins))
        except EdgepinError as e:  # refused, unreachable, or an assignment that is no record
            LOG.warning("reconcile: the assignment cannot be read: %s", e.message)
            return Observed(time.time(), problem=e)

    def _converge(self) -> Outcome:
        plan = decide(
            self._ledger(), self.counters.refused_since, self.observe(), self.cfg.revoke_grace
        )
        self.ledger = plan.ledger
        self.counters.refused_since = plan.refused_since
        if plan.step is Step.REVOKE:
            return self.revoke(plan)
        refusal: Outcome | None = None
        if plan.refusal is not None:
            LOG.error("reconcile: %s", plan.refusal.message)
            refusal = Outcome(State.REFUSED, plan.refusal.message, plan.refusal)
        elif plan.step is Step.UPDATE and plan.assignment is not None:
            refusal = self.update(plan.assignment, Online(self._client()))
            if refusal is not None and refusal.state in (State.REFUSED, State.ROLLED_BACK):
                self._reject(plan.assignment)
            if refusal is not None and refusal.state is State.ROLLED_BACK:
                return refusal
        return self.keep_running(plan, refusal)

    def _reject(self, assignment: Assignment) -> None:
        led = self._ledger()
        rejected = {**led.rejected, assignment.image_id: assignment.generation}
        self.ledger = replace(led, rejected=rejected)

    def keep_running(self, plan: Plan, refusal: Outcome | None) -> Outcome:
        """Make sure the current guest runs: at boot, offline, after a libvirtd restart."""
        current = self._ledger().current
        offline = plan.offline
        if current is None:
            if refusal:
                return refusal
            if offline is not None:
                kind = AuthError if isinstance(offline, AuthError) else ServiceUnavailableError
                none_yet = kind(f"no guest yet: {offline.message}", **offline.fields)
                return Outcome(State.OFFLINE, none_yet.message, none_yet)
            return Outcome(State.WAITING, "no assignment yet")
        if not domain.running(self.cfg, self.conn, current.image_id):
            try:
                self.start(current)
                ok, why = domain.healthy(self.cfg, self.conn, current.image_id, None, 10.0)
            except EdgepinError as e:
                return Outcome(State.FAILED, e.message, e)
            if not ok:
                down = GuestError(f"the guest did not stay up: {why}", image_id=current.image_id)
                return Outcome(State.FAILED, down.message, down)
            LOG.info("%s: guest %s started from the local copy", self.doing, current.image_id)
        if refusal:
            return refusal
        if offline is not None:
            # an unreachable control plane is weather (exit 0); a refused credential needs
            # an operator (exit 4, counted as a failure)
            return Outcome(
                State.OFFLINE,
                f"guest running from the local copy; {offline.message}",
                offline if isinstance(offline, AuthError) else None,
            )
        if self.counters.reported.get(current.image_id) != MemberStatus.ACCEPTED:
            self._report(current.image_id, MemberStatus.ACCEPTED)
        LOG.info("%s passed", self.doing)
        return Outcome(State.RUNNING, f"guest {current.image_id} running")

    # ------------------------------------------------------------------ steps
    def start(self, guest: Guest) -> None:
        """Start a guest from its local copy, checked against the ledger first."""
        led = self._ledger()
        known = led.images.get(guest.image_id)
        try:
            check_local_copy(self.cfg, known, guest.image_id)
            passphrase = keys.unseal(self.cfg, guest.image_id, known.key_sha256 if known else None)
        except VerificationError as e:  # the local copy, not the TPM: fetch it again
            LOG.error("%s: refusing to start %s: %s", self.doing, guest.image_id, e.message)
            self.forget(guest.image_id)
            raise
        spec = domain.GuestSpec(
            guest.image_id,
            guest.generation,
            guest.disk(self.cfg.images_dir),
            guest.vcpus,
            guest.memory_mb,
            network=guest.network,
            usb=guest.usb,
            pci=guest.pci,
            node_id=led.enrollment.node_id,
        )
        try:
            domain.start(self.cfg, self.conn, spec, passphrase)
        finally:
            del passphrase

    def forget(self, image_id: str) -> None:
        """Drop a local copy (and its sealed key), so that the next run fetches it again."""
        (self.cfg.images_dir / f"{image_id}.qcow2").unlink(missing_ok=True)
        keys.forget(self.cfg, image_id)
        led = self._ledger()
        if image_id in led.images:
            self.ledger = replace(
                led, images={k: v for k, v in led.images.items() if k != image_id}
            )

    def _record(self, image_id: str, record: ImageRecord) -> None:
        led = self._ledger()
        self.ledger = replace(led, images={**led.images, image_id: record})
        self.save()

    def update(self, assignment: Assignment, source: ImageSource) -> Outcome | None:
        """Fetch, verify and switch to the assigned image. None when the switch succeeded."""
        staged = self.stage(assignment, source)
        if isinstance(staged, Outcome):
            return staged
        return self.switch(staged)

    def stage(self, assignment: Assignment, source: ImageSource) -> Guest | Outcome:
        """Bring the assigned image and its key onto the node, verified, beside the running
        guest; the guest to switch to, or why not (nothing running is touched)."""
        image_id = assignment.image_id
        try:
            image = source.image(image_id)
            fetch.check_properties(image)
            fetch.check_assigned(image, assignment)
            guest = assigned_guest(image, assignment)
            domain.check_fits(
                self.cfg,
                self.conn,
                guest.vcpus,
                guest.memory_mb,
                guest.network,
                guest.usb,
                guest.pci,
            )
            known = self._ledger().images.get(image_id)
            if not (
                guest.disk(self.cfg.images_dir).exists()
                and known
                and known.sha512 == image["os_hash_value"]
            ):
                cert = fetch.choose_certificate(
                    image, fetch.load_pinned(self.cfg.pinned_certs_dir), source.certificate
                )
                if source.resumable:
                    self.counters.fetching = f"{image_id}.partial"
                    self.save()
                try:
                    result = source.fetch(image, cert, self.cfg.images_dir)
                finally:
                    self.counters.fetching = None
                self.counters.bytes_fetched_total += result.bytes_fetched
                self._record(image_id, ImageRecord(result.sha512, result.size))
            known = self._ledger().images[image_id]
            key = source.seal_key(self.cfg, image, known.key_sha256)
            self._record(image_id, replace(known, key_sha256=key))
        except (VerificationError, ImageError, NotFoundError, GuestError) as e:
            LOG.error("%s: image %s refused: %s", self.doing, image_id, e.message)
            self._report(image_id, MemberStatus.REJECTED)
            return Outcome(State.REFUSED, e.message, e)
        except (ServiceUnavailableError, AuthError, StateError, TrustError) as e:
            LOG.error("%s: update to %s not possible now: %s", self.doing, image_id, e.message)
            return Outcome(State.OFFLINE if self._ledger().current else State.FAILED, e.message, e)
        return guest

    def switch(self, guest: Guest) -> Outcome | None:
        led = self._ledger()
        old = led.current
        if old is not None and old.image_id == guest.image_id:  # the same image, fetched again
            old = led.previous
        try:
            self.start(guest)
            ok, why = domain.healthy(
                self.cfg, self.conn, guest.image_id, guest.health_marker, self.cfg.health_timeout
            )
        except EdgepinError as e:
            ok, why = False, e.message
        if ok:
            self.ledger = replace(self._ledger(), previous=old, current=guest)
            self._report(guest.image_id, MemberStatus.ACCEPTED)
            self.prune()
            LOG.info(
                "reconcile: switched to image %s (generation %d): %s",
                guest.image_id,
                guest.generation,
                why,
            )
            return None
        LOG.error(
            "%s: new guest %s not healthy (%s); rolling back", self.doing, guest.image_id, why
        )
        self._report(guest.image_id, MemberStatus.REJECTED)
        err = GuestError(
            f"new guest {guest.image_id} not healthy: {why}; rolled back", image_id=guest.image_id
        )
        if old is not None:
            try:
                self.start(old)
            except EdgepinError as e:
                return Outcome(State.FAILED, f"{err.message}; rollback failed: {e.message}", e)
            return Outcome(State.ROLLED_BACK, err.message, err)
        domain.stop(self.cfg, self.conn)
        return Outcome(State.FAILED, err.message, err)

    def prune(self) -> None:
        """Keep the current and the previous image (all a rollback needs), nothing else."""
        led = self._ledger()
        keep = {g.image_id for g in (led.current, led.previous) if g}
        for path in self.cfg.images_dir.glob("*.qcow2"):
            image_id = path.name.removesuffix(".qcow2")
            if image_id not in keep:
                self.forget(image_id)
                LOG.info("%s: removed old image %s", self.doing, image_id)
        for path in self.cfg.images_dir.glob("*.partial"):
            if (
                path.name.removesuffix(".partial") not in keep
                and self.counters.fetching != path.name
            ):
                path.unlink(missing_ok=True)

    def revoke(self, plan: Plan) -> Outcome:
        """Keystone has refused the node for longer than the grace period: stop the guest,
        destroy every sealed image key and every image. The node credential stays sealed:
        Keystone refuses it, and only a new enrollment makes the node useful again."""
        led = self._ledger()
        domain.stop(self.cfg, self.conn)
        destroyed = sorted({*led.images, *keys.sealed_ids(self.cfg)})
        for image_id in destroyed:
            self.forget(image_id)
        for path in self.cfg.images_dir.glob("*.partial"):
            path.unlink(missing_ok=True)
        self.counters.fetching = None
        self.ledger = replace(self._ledger(), current=None, previous=None, images={})
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(plan.refused_since or 0))
        reason = (
            f"keystone has refused the node's credential since {since}: guest stopped, "
            f"keys and images destroyed ({len(destroyed)})"
        )
        if destroyed or led.current is not None:
            LOG.error("reconcile: %s", reason)
        err = AuthError(reason, refused_since=since)
        return Outcome(State.REVOKED, reason, err)
