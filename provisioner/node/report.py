"""Reporting on the node: ``/run/edgepin/status.json`` and Prometheus metrics, both from
one :class:`provisioner.node.model.Status` (the member status on Glance is the client's)."""

from __future__ import annotations

import time

from provisioner.errors import Reason
from provisioner.node import state
from provisioner.node.config import NodeConfig
from provisioner.node.model import State, Status


def write_status(cfg: NodeConfig, status: Status) -> None:
    data = {**status.as_dict(), "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    state.write_json(cfg.status_path, data, mode=0o644)
    state.atomic_write(cfg.metrics_path, metrics(status).encode(), mode=0o644)


def metrics(status: Status) -> str:
    """Prometheus textfile-collector format: every state and every failure kind, always."""
    lines = [
        "# HELP edgepin_generation Generation of the assignment the guest runs.",
        "# TYPE edgepin_generation gauge",
        f"edgepin_generation {status.generation or 0}",
        "# HELP edgepin_state Current state of the node (1 for the active state).",
        "# TYPE edgepin_state gauge",
    ]
    for name in State:
        lines.append(f'edgepin_state{{state="{name}"}} {int(status.state == name)}')
    lines += [
        "# HELP edgepin_last_success_timestamp_seconds End of the last successful reconcile.",
        "# TYPE edgepin_last_success_timestamp_seconds gauge",
        f"edgepin_last_success_timestamp_seconds {status.last_success or 0:.0f}",
        "# HELP edgepin_bytes_fetched_total Image bytes downloaded by the node.",
        "# TYPE edgepin_bytes_fetched_total counter",
        f"edgepin_bytes_fetched_total {status.bytes_fetched_total}",
        "# HELP edgepin_failures_total Failed reconciles by kind.",
        "# TYPE edgepin_failures_total counter",
    ]
    for kind in Reason:
        lines.append(f'edgepin_failures_total{{kind="{kind}"}} {status.failures.get(kind, 0)}')
    return "\n".join(lines) + "\n"
