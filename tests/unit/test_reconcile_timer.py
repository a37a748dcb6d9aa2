"""The reconcile timer's period and random delay: one default, the same in build.sh, the
element and the unit file (``tests/integration/test_build_options.py`` runs build.sh with bad
values; the image tier reads the timer systemd loaded on the booted node)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TIMER = REPO / "provisioner/units/edgepin-reconcile.timer"
ENVIRONMENT = REPO / "elements/edgepin-provisioner/environment.d/10-edgepin-provisioner.bash"
INSTALL = REPO / "elements/edgepin-provisioner/install.d/50-edgepin-provisioner"


def element_default(variable: str) -> str:
    m = re.search(rf"^export {variable}=\${{{variable}:-([^}}]*)}}$", ENVIRONMENT.read_text(), re.M)
    assert m, f"{variable} has no default in {ENVIRONMENT.name}"
    return m.group(1)


def build_sh_default(name: str) -> str:
    text = (REPO / "build.sh").read_text()
    body = text[text.index("cmd_image() {") :]
    m = re.search(rf"\b{name}=([^ \n]+)", body)
    assert m, f"cmd_image sets no default {name}"
    return m.group(1)


def timer_setting(key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", TIMER.read_text(), re.M)
    assert len(values) == 1, values
    return values[0]


def test_one_default_interval_and_delay_everywhere() -> None:
    # the sizing in docs/performance.md: one hour, up to ten minutes of random delay
    assert build_sh_default("interval") == "1h"
    assert build_sh_default("delay") == "10min"
    assert element_default("DIB_EDGEPIN_RECONCILE_INTERVAL") == "1h"
    assert element_default("DIB_EDGEPIN_RECONCILE_DELAY") == "10min"
    assert timer_setting("OnUnitActiveSec") == "1h"
    assert timer_setting("OnBootSec") == "1h"
    assert timer_setting("RandomizedDelaySec") == "10min"


def test_the_element_writes_both_into_the_timers_drop_in() -> None:
    text = INSTALL.read_text()
    drop_in = text[text.index("interval.conf <<CONF") : text.index("\nCONF\n")]
    assert "OnUnitActiveSec=$DIB_EDGEPIN_RECONCILE_INTERVAL" in drop_in
    assert "OnBootSec=$DIB_EDGEPIN_RECONCILE_INTERVAL" in drop_in
    assert "RandomizedDelaySec=$DIB_EDGEPIN_RECONCILE_DELAY" in drop_in
