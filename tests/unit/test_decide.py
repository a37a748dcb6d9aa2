"""The reconcile's decision, the node's parsers of control-plane input and its one HTTP
mapping: pure logic, driven with arbitrary input (hypothesis) and with the cases that
once crashed a reconcile or let it fail open."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import assignment
from provisioner.errors import (
    AlreadyRefused,
    AuthError,
    CredentialRefused,
    EdgepinError,
    GenerationConflict,
    GenerationRollback,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    VerificationError,
)
from provisioner.node import client, ledger, model
from provisioner.node.decide import Observed, Step, decide
from provisioner.node.model import Assignment, Counters, Guest, ImageRecord, Ledger
from provisioner.signing import fingerprint
from tests.certs import self_signed
from tests.unit.fakes import IMAGE_A, IMAGE_B, enrollment_record, json_values, node_client

pytestmark = pytest.mark.unit

GRACE = 600.0
NOW = 1_800_000_000.0
SHA = "d" * 128  # the sha512 of RECORD, the image the node keeps
AT = "2026-12-02T13:00:00Z"
KEY = ec.generate_private_key(ec.SECP384R1())
CERT = self_signed(KEY)
PINNED = {fingerprint(CERT): CERT}
IMAGE_C = "5e4d3c2b-1a09-4f8e-8d7c-6b5a49382716"
RECORD = ImageRecord("d" * 128, 10, "e" * 64)


def enrollment() -> model.Enrollment:
    return ledger.enrollment(enrollment_record())


def guest(image_id: str, gen: int) -> Guest:
    return Guest(image_id, gen, vcpus=1, memory_mb=64)


def running(image_id: str = IMAGE_A, gen: int = 3) -> Ledger:
    return Ledger(
        enrollment(),
        highest_generation=gen,
        floor_image_id=image_id,
        current=guest(image_id, gen),
        images={image_id: RECORD},
    )


def seen(
    image_id: str | None = None, gen: int = 0, problem: EdgepinError | None = None
) -> Observed:
    a = Assignment(image_id, gen, SHA, AT) if image_id else None
    return Observed(NOW, assignment=a, problem=problem)


# ------------------------------------------------------------------ cases


def test_a_new_image_at_a_higher_generation_is_fetched_and_the_floor_follows() -> None:
    plan = decide(running(), None, seen(IMAGE_B, 4), GRACE)
    assert plan.step is Step.UPDATE and plan.assignment == Assignment(IMAGE_B, 4, SHA, AT)
    assert plan.ledger.highest_generation == 4 and plan.ledger.floor_image_id == IMAGE_B


def test_the_same_image_at_a_new_generation_is_kept_and_recorded() -> None:
    plan = decide(running(), None, seen(IMAGE_A, 5), GRACE)
    assert plan.step is Step.KEEP and plan.ledger.current == guest(IMAGE_A, 5)


def test_an_older_generation_is_a_rollback_and_changes_nothing() -> None:
    before = running(gen=3)
    plan = decide(before, None, seen(IMAGE_B, 2), GRACE)
    assert plan.step is Step.REFUSE and isinstance(plan.refusal, GenerationRollback)
    assert plan.refusal.fields == {"image_id": IMAGE_B, "generation": 2, "floor": 3}
    assert plan.ledger == before


def test_the_same_generation_never_names_another_image() -> None:
    plan = decide(running(gen=3), None, seen(IMAGE_B, 3), GRACE)
    assert plan.step is Step.REFUSE and isinstance(plan.refusal, GenerationConflict)
    assert "named image" in plan.refusal.message


def test_an_image_refused_at_this_generation_is_not_tried_again() -> None:
    before = dataclasses.replace(running(), rejected={IMAGE_B: 4})
    plan = decide(before, None, seen(IMAGE_B, 4), GRACE)
    assert plan.step is Step.REFUSE and isinstance(plan.refusal, AlreadyRefused)
    assert decide(before, None, seen(IMAGE_B, 5), GRACE).step is Step.UPDATE


def test_a_current_image_whose_sha512_is_not_the_signed_one_is_not_kept() -> None:
    """The ledger's copy of the current image hashes to something else than the signed
    assignment names: the reconcile asks Glance again (and refuses it there if Glance's
    sha512 is not the signed one either), never keeps the copy for that assignment."""
    other = Assignment(IMAGE_A, 3, "cd" * 64, AT)
    plan = decide(running(), None, Observed(NOW, assignment=other), GRACE)
    assert plan.step is Step.UPDATE and plan.assignment == other


def test_a_current_image_whose_local_copy_was_dropped_is_fetched_again() -> None:
    before = dataclasses.replace(running(), images={})
    assert decide(before, None, seen(IMAGE_A, 3), GRACE).step is Step.UPDATE


def test_an_assignment_not_signed_for_this_node_is_refused_and_the_guest_kept() -> None:
    problem = VerificationError("the assignment is signed for another node: refused")
    plan = decide(running(), None, seen(problem=problem), GRACE)
    assert plan.step is Step.REFUSE and plan.refusal is problem
    assert plan.ledger == running()  # the floor and the current guest as they were


def test_a_malformed_assignment_is_refused_and_the_guest_kept() -> None:
    plan = decide(running(), NOW - 10, seen(problem=ImageError("not JSON")), GRACE)
    assert plan.step is Step.REFUSE and plan.refused_since is None


def test_keystone_refusing_the_node_revokes_only_after_the_grace_period() -> None:
    refused = CredentialRefused(401)
    first = decide(running(), None, seen(problem=refused), GRACE)
    assert first.step is Step.KEEP and first.refused_since == NOW and first.offline is refused
    later = decide(running(), NOW - GRACE + 1, seen(problem=refused), GRACE)
    assert later.step is Step.KEEP and later.refused_since == NOW - GRACE + 1
    assert decide(running(), NOW - GRACE, seen(problem=refused), GRACE).step is Step.REVOKE
    # a clock that ran backwards (or an edited counters file) starts the period again
    assert decide(running(), NOW + 3600, seen(problem=refused), GRACE).refused_since == NOW


def test_an_unreachable_control_plane_never_revokes_and_a_success_resets_the_clock() -> None:
    down = ServiceUnavailableError("unreachable")
    plan = decide(running(), NOW - 10 * GRACE, seen(problem=down), GRACE)
    assert plan.step is Step.KEEP and plan.refused_since == NOW - 10 * GRACE
    assert decide(running(), NOW - 10 * GRACE, seen(IMAGE_A, 3), GRACE).refused_since is None
    assert decide(running(), NOW - 10 * GRACE, seen(), GRACE).refused_since is None


# ------------------------------------------------------------------ properties

image_ids = st.sampled_from([IMAGE_A, IMAGE_B, IMAGE_C])
generations = st.integers(0, 8) | st.just(model.MAX_GENERATION)
guests = st.builds(guest, image_ids, generations)
ledgers = st.builds(
    Ledger,
    st.just(enrollment()),
    highest_generation=generations,
    floor_image_id=st.none() | image_ids,
    current=st.none() | guests,
    previous=st.none() | guests,
    images=st.dictionaries(image_ids, st.just(RECORD), max_size=3),
    rejected=st.dictionaries(image_ids, generations, max_size=3),
)
problems = st.sampled_from(
    [
        None,
        CredentialRefused(401),
        CredentialRefused("authentication"),
        ServiceUnavailableError("down"),
        ImageError("malformed"),
        VerificationError("signed for another node"),
    ]
)
moments = st.none() | st.floats(0, 2 * NOW, allow_nan=False)


@settings(max_examples=500)
@given(ledgers, moments, st.none() | st.builds(Assignment, image_ids, generations), problems)
def test_the_decision_is_total_and_keeps_its_promises(
    before: Ledger, since: float | None, a: Assignment | None, problem: EdgepinError | None
) -> None:
    observed = Observed(NOW, assignment=None if problem else a, problem=problem)
    plan = decide(before, since, observed, GRACE)
    after = plan.ledger
    # the floor never goes down; only the floor, its image and the current generation change
    assert after.highest_generation >= before.highest_generation
    assert after.images == before.images and after.rejected == before.rejected
    assert after.previous == before.previous
    if after.current != before.current:
        assert before.current is not None and after.current is not None
        assert after.current.image_id == before.current.image_id
    # only Keystone's refusal, held for the whole grace period, revokes
    if plan.step is Step.REVOKE:
        assert isinstance(problem, CredentialRefused)
        assert plan.refused_since is not None and NOW - plan.refused_since >= GRACE
    if isinstance(problem, ServiceUnavailableError):
        assert plan.step is Step.KEEP and plan.refused_since == since
    # an update goes to the assignment, above the floor or at it for the same image
    if plan.step is Step.UPDATE:
        assert a is not None and plan.assignment == a and problem is None
        assert a.generation > before.highest_generation or (
            a.generation == before.highest_generation
            and before.floor_image_id in (None, a.image_id)
        )
        assert before.rejected.get(a.image_id) != a.generation
    if plan.step is Step.REFUSE:
        assert plan.refusal is not None and plan.refusal.message


@settings(max_examples=300)
@given(json_values | st.text(max_size=80))
def test_counters_from_anything_are_counters(raw: Any) -> None:
    counters = Counters.from_dict(raw)
    assert counters.bytes_fetched_total >= 0
    assert all(type(v) is int and v >= 0 for v in counters.failures.values())
    assert set(counters.reported.values()) <= set(model.MemberStatus)
    for moment in (counters.last_success, counters.refused_since):
        assert moment is None or (math.isfinite(moment) and moment >= 0)


image_properties = st.dictionaries(
    st.sampled_from(["id", "edgepin_vcpus", "edgepin_memory_mb", "edgepin_health_marker"])
    | st.sampled_from(["edgepin_version"]),
    json_values | st.text(max_size=30) | st.just(IMAGE_A),
)


@settings(max_examples=300)
@given(image_properties, generations)
def test_what_an_image_asks_for_is_a_guest_or_an_image_error(
    image: dict[str, Any], gen: int
) -> None:
    try:
        g = model.guest_from_image(image, gen)
    except ImageError:
        return
    assert model.IMAGE_ID.fullmatch(g.image_id) and 1 <= g.vcpus <= model.MAX_VCPUS
    assert g.version.isprintable() and len(g.version) <= model.VERSION_SIZE


def test_a_hostile_version_string_loses_its_control_characters() -> None:
    g = model.guest_from_image({"id": IMAGE_A, "edgepin_version": "1.0\x1b[2J\x07"}, 1)
    assert g.version == "1.0[2J"


# ------------------------------------------------------------------ the one HTTP mapping


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (500, ServiceUnavailableError),
        (503, ServiceUnavailableError),
        (302, ServiceUnavailableError),
        (418, ServiceUnavailableError),
    ],
)
def test_every_status_maps_to_one_error(status: int, error: type[EdgepinError]) -> None:
    with pytest.raises(error) as e:
        client.check(status, "glance", "image x")
    assert type(e.value) is error and e.value.fields["status"] == status
    client.check(200, "glance", "image x")


class _Answer:
    def __init__(self, status: int, body: Any = None) -> None:
        self.status_code = status
        self.body = body
        self.content = b""
        self.headers: dict[str, str] = {}

    def json(self) -> Any:
        return self.body

    def iter_content(self, chunk_size: int) -> Any:
        return iter(())

    def close(self) -> None:
        pass


class _Session:
    def __init__(self, status: int, body: Any = None) -> None:
        self.answer = _Answer(status, body)

    def get(self, *args: Any, **kwargs: Any) -> _Answer:
        return self.answer

    def put(self, *args: Any, **kwargs: Any) -> _Answer:
        return self.answer


@pytest.mark.parametrize("status", [401, 403])
def test_access_refused_during_an_update_is_not_a_verdict_on_the_image(
    status: int,
) -> None:
    """A 401/403 on the image's metadata or its key is AuthError, which the reconcile
    treats as "not now", never as a refusal recorded for good (the download's own case is
    in test_fetch_verify.py)."""
    c = node_client(_Session(status))
    with pytest.raises(AuthError):
        c.image(IMAGE_A)
    with pytest.raises(AuthError):
        c.secret("s", text=True)


def test_keystone_refusing_the_node_is_a_credential_refusal() -> None:
    for status in (401, 403):
        with pytest.raises(CredentialRefused):
            node_client(_Session(status)).assignment(PINNED)
    with pytest.raises(ServiceUnavailableError):
        node_client(_Session(503)).assignment(PINNED)
    record = assignment.sign(KEY, CERT, "p" * 32, "node-1", IMAGE_A, SHA, 2, AT)
    body = {"project": {model.ASSIGNMENT_ATTR: record}}
    assert node_client(_Session(200, body)).assignment(PINNED) == Assignment(IMAGE_A, 2, SHA, AT)
    assert node_client(_Session(200, {"project": {}})).assignment(PINNED) is None
    with pytest.raises(ServiceUnavailableError, match="malformed"):
        node_client(_Session(200, ["x"])).assignment(PINNED)
    # an unsigned record is refused, with the reason the reconcile reports
    unsigned = {"project": {model.ASSIGNMENT_ATTR: {"image_id": IMAGE_A, "generation": 2}}}
    with pytest.raises(ImageError, match="not signed"):
        node_client(_Session(200, unsigned)).assignment(PINNED)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "os_hash_algo",
                "os_hash_value",
                "img_signature",
                "img_signature_hash_method",
                "img_signature_key_type",
                "img_signature_certificate_uuid",
                "os_encrypt_key_id",
                "os_encrypt_format",
                "disk_format",
                "size",
            ]
        )
        | st.text(max_size=10),
        json_values | st.text(max_size=5000),
    )
)
def test_image_metadata_is_accepted_or_refused_with_edgepins_error(image: dict[str, Any]) -> None:
    from provisioner.node import fetch

    try:
        fetch.check_properties(image)
    except (ImageError, VerificationError):
        pass
