"""The fleet's figures: the summary of ``edgepin status`` and the same in Prometheus' format."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.operator.status import prometheus, summary
from tests.unit.fakes import IMAGE_A, IMAGE_B

pytestmark = pytest.mark.unit


def row(node: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": node,
        "labels": {},
        "image_id": None,
        "image": None,
        "generation": None,
        "member_status": None,
        "running_image_id": None,
        "running_generation": None,
        "outcome": None,
        "seen_at": None,
    }
    return {**base, **kw}


ROWS = [
    row(
        "n1",
        labels={"site": "paris-1", "hw.class": "a"},
        image_id=IMAGE_A,
        image='web "1"',
        generation=3,
        running_image_id=IMAGE_A,
        running_generation=3,
        outcome="running",
        member_status="accepted",
        seen_at="2026-12-03T10:00:00Z",
    ),
    row("n2", image_id=IMAGE_A, image='web "1"', generation=2, outcome="refused"),
    row("n3", image_id=IMAGE_B, generation=1, running_image_id=IMAGE_A, outcome="running"),
    row("n4"),
]


def test_the_summary() -> None:
    s = summary(ROWS)
    assert s["nodes"] == 4 and s["current"] == 1
    assert s["by_outcome"] == {"no report": 1, "refused": 1, "running": 2}
    assert s["by_image"] == {IMAGE_A: 2, IMAGE_B: 1, "none": 1}


def test_prometheus_text() -> None:
    text = prometheus(ROWS)
    assert 'edgepin_fleet_nodes{outcome="running"} 2' in text
    assert 'edgepin_fleet_nodes{outcome="rolled-back"} 0' in text  # every state, always
    assert "edgepin_fleet_nodes_current 1" in text
    assert f'edgepin_fleet_image_nodes{{image_id="{IMAGE_A}",image="web \\"1\\""}} 2' in text
    assert (
        f'edgepin_node_info{{node="n1",image_id="{IMAGE_A}",running_image_id="{IMAGE_A}",'
        'outcome="running",member_status="accepted",label_hw_class="a",label_site="paris-1"} 1'
    ) in text
    assert 'edgepin_node_last_seen_timestamp_seconds{node="n1"} 1796292000' in text
    assert 'edgepin_node_running_generation{node="n4"}' not in text
    for line in text.splitlines():
        assert line.startswith("# ") or line.startswith("edgepin_"), line
