"""Create many node identities in the test bed's Keystone at once, for fleet benchmarks.

Run with the services' Python (``.venv-services``) and the bed's ``keystone.conf``; it
reads one JSON record per line on stdin and writes one line per node on stdout. Each node
gets what ``edgepin enroll`` gives it: its own project (with the signed assignment as the
project's attribute), its own user with the member role on that project, and an
application credential scoped to the project with the member role (and the roles it
implies, as the API gives them) and the node's access rules, under the secret given on
stdin (never on a command line).

It calls Keystone's own managers (and, for the credential, its driver) in this process
(``keystone.server.backends``), on the bed's database and cache, so each node costs a
few SQL statements instead of six API requests, each with its token validation and policy
check: 10,000 nodes in minutes, not hours. Only the set-up goes this way; every
reconcile the benchmark measures goes through the HTTP API. Records on stdin::

    {"project_id": ..., "name": ..., "domain_id": ..., "role_id": ..., "cred_id": ...,
     "cred_name": ..., "secret": ..., "access_rules": [...], "attrs": {...}}

and on stdout ``{"name": ..., "project_id": ..., "user_id": ...}``.
"""

from __future__ import annotations

import json
import sys
import uuid


def main(argv: list[str]) -> int:
    import keystone.conf
    from keystone.common import provider_api, sql
    from keystone.server import backends

    conf = keystone.conf.CONF
    keystone.conf.configure()
    sql.initialize()
    conf(args=argv, project="keystone", default_config_files=[])
    backends.load_backends()
    api = provider_api.ProviderAPIs

    implied: dict[str, list[dict[str, str]]] = {}
    for line in sys.stdin:
        rec = json.loads(line)
        role_id = rec["role_id"]
        if role_id not in implied:  # as the API does: the role and every role it implies
            implied[role_id] = [{"id": role_id}] + [
                {"id": r["implied_role_id"]} for r in api.role_api.list_implied_roles(role_id)
            ]
        project = {
            "id": rec["project_id"],
            "name": rec["name"],
            "domain_id": rec["domain_id"],
            "parent_id": rec["domain_id"],
            "is_domain": False,
            "enabled": True,
            "description": "",
            "tags": [],
            **rec["attrs"],
        }
        api.resource_api.create_project(rec["project_id"], project)
        user = api.identity_api.create_user(
            {
                "name": rec["name"],
                "domain_id": rec["domain_id"],
                "enabled": True,
                "default_project_id": rec["project_id"],
            }
        )
        api.assignment_api.add_role_to_user_and_project(
            user["id"], rec["project_id"], rec["role_id"]
        )
        # the driver itself: the manager's check that the user holds the roles (an
        # effective-assignment listing, most of a node's time here) is moot, it was just
        # granted above
        api.application_credential_api.driver.create_application_credential(
            {
                "id": rec["cred_id"],
                "name": rec["cred_name"],
                "description": None,
                "secret": rec["secret"],
                "user_id": user["id"],
                "project_id": rec["project_id"],
                "expires_at": None,
                "system": None,
                "unrestricted": False,
            },
            implied[role_id],
            [{**r, "id": uuid.uuid4().hex} for r in rec["access_rules"]],
        )
        out = {"name": rec["name"], "project_id": rec["project_id"], "user_id": user["id"]}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
