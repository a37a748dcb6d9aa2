"""Reporting: the Glance member status, /run/edgepin/status.json and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from provisioner.node import state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)


def member_status(sess: Any, interface: str, image_id: str, project_id: str, status: str) -> bool:
    """Set this node's member status on an image; False (logged) when it cannot be set."""
    try:
        r = sess.put(
            f"/v2/images/{image_id}/members/{project_id}",
            endpoint_filter={"service_type": "image", "interface": interface},
            json={"status": status},
            raise_exc=False,
        )
    except Exception as e:  # reporting never breaks the node; the local status has it
        LOG.warning("report: member status %s for %s not set: %s", status, image_id, e)
        return False
    if r.status_code != 200:
        LOG.warning("report: member status %s for %s: HTTP %s", status, image_id, r.status_code)
        return False
    return True


def write_status(cfg: NodeConfig, status: dict[str, Any]) -> None:
    status = {**status, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    state.write_json(cfg.status_path, status, mode=0o644)
    state.atomic_write(cfg.metrics_path, metrics(status).encode(), mode=0o644)


# every state reconcile reports (Outcome.state), so that exactly one series is 1
STATES = (
    "running",
    "offline",
    "refused",
    "failed",
    "rolled-back",
    "waiting",
    "disabled",
    "unenrolled",
)


def metrics(status: dict[str, Any]) -> str:
    """Prometheus textfile-collector format."""
    lines = [
        "# HELP edgepin_generation Generation of the assignment the guest runs.",
        "# TYPE edgepin_generation gauge",
        f"edgepin_generation {int(status.get('generation') or 0)}",
        "# HELP edgepin_state Current state of the node (1 for the active state).",
        "# TYPE edgepin_state gauge",
    ]
    for name in STATES:
        lines.append(f'edgepin_state{{state="{name}"}} {int(status.get("state") == name)}')
    lines += [
        "# HELP edgepin_last_success_timestamp_seconds End of the last successful reconcile.",
        "# TYPE edgepin_last_success_timestamp_seconds gauge",
        f"edgepin_last_success_timestamp_seconds {float(status.get('last_success') or 0):.0f}",
        "# HELP edgepin_bytes_fetched_total Image bytes downloaded by the node.",
        "# TYPE edgepin_bytes_fetched_total counter",
        f"edgepin_bytes_fetched_total {int(status.get('bytes_fetched_total') or 0)}",
        "# HELP edgepin_failures_total Failed reconciles by kind.",
        "# TYPE edgepin_failures_total counter",
    ]
    for kind, count in sorted((status.get("failures") or {}).items()):
        lines.append(f'edgepin_failures_total{{kind="{kind}"}} {int(count)}')
    return "\n".join(lines) + "\n"
