"""Which node users may read which secret: derived from the nodes' records, never edited.

Barbican has no call that adds one user to a secret's ACL. ``PUT`` and ``PATCH`` on
``/v1/secrets/{id}/acl`` both replace the whole user list of each operation they name
(barbican/api/controllers/acls.py and ``SecretACLRepo._create_or_replace_acl_users``: "It
does not apply partial update of user ids"), and python-barbicanclient's ACL API is a
``GET`` (``acls.get``) and that ``PUT`` (``SecretACL.submit``). Two assigns that each read a
list, add their node and write it back can lose one of the two nodes.

So no writer edits a list. Each node's record (its project's ``edgepin_grants``, written
only by the commands that act on that node) says which secrets that node needs; the read
ACL of a secret is *derived*: the users of the nodes whose records name it, plus whatever
users that are not edgepin nodes the ACL already had. A command that changed a node's
record then runs :func:`sync` over the secrets the change touched:

1. read every node's record and compute each touched secret's user list;
2. write those lists (``PUT``);
3. read the records again; if any touched secret's list would now differ, go to 2.

Why no entry is lost: take the last ``PUT`` on a secret. Its writer read the records again
after that ``PUT`` had landed, found the same list, and stopped; so every record change
made before that re-read is in the final list. A record change made after it is made by a
writer that will itself ``PUT`` afterwards, contradicting "last". Every writer ``PUT``s at
least once after its own record change, and stops only when a read taken after its last
``PUT`` agrees. A writer that cannot finish (Barbican failing until the deadline) reports
an error: running the command again converges, since it only rewrites derived lists.

This relies on Keystone reading back what it has written (a listing made after a project
update returns the update) and on Barbican applying each ``PUT`` as one transaction.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from provisioner import barbican
from provisioner.errors import NotFoundError, ServiceUnavailableError
from provisioner.operator import nodes

log = logging.getLogger(__name__)

DEADLINE_S = 120.0
_jitter = random.SystemRandom()


def wanted(fleet: Iterable[nodes.Node], secret_ids: Iterable[str]) -> dict[str, frozenset[str]]:
    """For each secret, the users of the nodes whose records name it (pure)."""
    users: dict[str, set[str]] = {sid: set() for sid in secret_ids}
    for node in fleet:
        if node.user is None:
            continue
        for sid in node.grants.get("secrets", []):
            if sid in users:
                users[sid].add(node.user_id)
    return {sid: frozenset(u) for sid, u in users.items()}


def node_users(fleet: Iterable[nodes.Node]) -> frozenset[str]:
    return frozenset(n.user_id for n in fleet if n.user is not None)


def acl_list(current: Iterable[str], managed: frozenset[str], want: frozenset[str]) -> list[str]:
    """The list to write: the wanted node users, and every user that is not a node's."""
    return sorted({u for u in current if u not in managed} | want)


def sync(
    conn: Any,
    domain_id: str,
    secret_ids: Iterable[str],
    *,
    deadline_s: float = DEADLINE_S,
    client: Any = None,
) -> dict[str, list[str]]:
    """Make each secret's read ACL list exactly the node users whose records name it.

    Call it after the records are written. Returns the node users each secret lists.
    """
    sids = sorted(set(secret_ids))
    if not sids:
        return {}
    client = client or barbican.acl_client(conn)
    fleet = nodes.list_nodes(conn, domain_id)
    want = wanted(fleet, sids)
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        managed = node_users(fleet)
        failed: list[str] = []
        for sid in sids:
            try:
                current = barbican.acl_users(client, sid)
                barbican.set_acl_users(client, sid, acl_list(current, managed, want[sid]))
            except NotFoundError:
                if want[sid]:
                    raise
                # a deleted secret: nobody can read it, there is nothing to withdraw
            except ServiceUnavailableError as e:
                # Barbican refusing one of two colliding writes (its database); the next
                # round writes the list again
                log.debug("ACL of %s: %s", sid, e.message)
                failed.append(sid)
        fleet = nodes.list_nodes(conn, domain_id)
        again = wanted(fleet, sids)
        if again == want and not failed:
            return {sid: sorted(want[sid]) for sid in sids}
        if time.monotonic() - start > deadline_s:
            raise ServiceUnavailableError(
                f"barbican: the read ACL of {', '.join(failed or sids)} did not settle "
                f"in {deadline_s:.0f} s ({attempt} rounds)",
                hint="the nodes' records are written: run the command again to finish",
                secret_ids=failed or sids,
            )
        want = again
        if failed:
            time.sleep(min(2.0, 0.05 * 2**attempt) * _jitter.random())
