"""The reconcile's decision: from what the node keeps and what it observed, what to do.

A pure function, tested without a TPM, libvirt or a control plane (and driven with
arbitrary input by hypothesis). :mod:`provisioner.node.reconcile` observes, asks
:func:`decide`, and carries the plan out.

Whatever the plan, the executor then makes sure the current guest runs, except after a
revocation: at boot, offline, after a refused assignment, after a failed update.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from provisioner.errors import (
    AlreadyRefused,
    CredentialRefused,
    EdgepinError,
    GenerationConflict,
    GenerationRollback,
    ImageError,
    VerificationError,
)
from provisioner.node.model import Assignment, Ledger


class Step(enum.StrEnum):
    KEEP = "keep"  # nothing new: keep the current guest running
    UPDATE = "update"  # fetch, verify and switch to the assignment's image
    REFUSE = "refuse"  # the assignment is refused; keep the current guest running
    REVOKE = "revoke"  # stop the guest, destroy its keys and images


@dataclass(frozen=True)
class Observed:
    """What this run learnt from the control plane."""

    now: float
    assignment: Assignment | None = None
    # why the assignment could not be read: CredentialRefused (an authenticated Keystone
    # refused the node), any other EdgepinError (unreachable, malformed): None when it was
    problem: EdgepinError | None = None


@dataclass(frozen=True)
class Plan:
    step: Step
    ledger: Ledger  # the ledger to keep (the floor and the refusals updated)
    refused_since: float | None  # Keystone's refusal clock, for the counters
    refusal: EdgepinError | None = None  # why the assignment is refused (REFUSE)
    offline: EdgepinError | None = None  # why the control plane could not be asked
    assignment: Assignment | None = None  # what to fetch and switch to (UPDATE)


def decide(ledger: Ledger, refused_since: float | None, seen: Observed, grace: float) -> Plan:
    if isinstance(seen.problem, CredentialRefused):
        since = seen.now if refused_since is None or refused_since > seen.now else refused_since
        if seen.now - since >= grace:
            return Plan(Step.REVOKE, ledger, since, offline=seen.problem)
        return Plan(Step.KEEP, ledger, since, offline=seen.problem)
    if isinstance(seen.problem, ImageError | VerificationError):
        # Keystone answered with a record that is none, or one not signed for this node
        return Plan(Step.REFUSE, ledger, None, seen.problem)
    if seen.problem is not None:  # unreachable: the refusal clock neither runs nor resets
        return Plan(Step.KEEP, ledger, refused_since, offline=seen.problem)
    a = seen.assignment
    if a is None:
        return Plan(Step.KEEP, ledger, None)
    floor = ledger.highest_generation
    if a.generation < floor:
        return Plan(Step.REFUSE, ledger, None, GenerationRollback(a.image_id, a.generation, floor))
    if (
        a.generation == floor
        and ledger.floor_image_id is not None
        and ledger.floor_image_id != a.image_id
    ):
        conflict = GenerationConflict(a.image_id, a.generation, ledger.floor_image_id)
        return Plan(Step.REFUSE, ledger, None, conflict)
    seen_now = replace(ledger, highest_generation=a.generation, floor_image_id=a.image_id)
    if ledger.rejected.get(a.image_id) == a.generation:
        return Plan(Step.REFUSE, seen_now, None, AlreadyRefused(a.image_id, a.generation))
    current = ledger.current
    known = ledger.images.get(a.image_id)
    if current is None or current.image_id != a.image_id or known is None:
        # a new image, or the current one whose local copy failed a check
        return Plan(Step.UPDATE, seen_now, None, assignment=a)
    if known.sha512 != a.image_sha512:
        # the local copy is not the image the signed assignment names: ask Glance again
        return Plan(Step.UPDATE, seen_now, None, assignment=a)
    return Plan(Step.KEEP, replace(seen_now, current=current.at(a.generation)), None)


BACKOFF_FIRST = 60.0
"""The first pause after a busy answer (429, 5xx) without ``Retry-After``; it doubles."""
BACKOFF_MAX = 3600.0
"""The longest pause, whatever the control plane says or the clock does."""


def quiet(quiet_until: float | None, now: float) -> bool:
    """Whether the node is still pausing its requests (a pause longer than
    :data:`BACKOFF_MAX` from now is a clock that jumped back, and is over)."""
    return quiet_until is not None and now < quiet_until <= now + BACKOFF_MAX


def back_off(
    streak: int, error: EdgepinError | None, now: float, spread: float
) -> tuple[float | None, int]:
    """After a run that asked the control plane: until when to ask nothing, and the count of
    busy answers in a row. A busy answer (429, 5xx) pauses the node for its ``Retry-After``
    or, without one, for :data:`BACKOFF_FIRST` doubled at each busy answer in a row up to
    :data:`BACKOFF_MAX`, times a random factor between 0.5 and 1 (``spread`` in [0, 1]) so
    that a site's nodes do not come back in the same second. Any other outcome ends it."""
    if error is None or error.fields.get("busy") is not True:
        return None, 0
    streak = min(max(streak, 0) + 1, 32)
    pause = error.fields.get("retry_after")
    if not isinstance(pause, int | float) or isinstance(pause, bool) or not 0 <= pause:
        pause = min(BACKOFF_FIRST * 2 ** (streak - 1), BACKOFF_MAX) * (0.5 + min(spread, 1) / 2)
    return now + min(float(pause), BACKOFF_MAX), streak
