"""The test bed's configuration edits (pure logic): what ``ControlPlane.reconfigured``
writes before it restarts a service."""

from __future__ import annotations

import pytest

from tests.testbed.controlplane import ControlPlaneError, set_options

pytestmark = pytest.mark.unit

CONF = (
    "[DEFAULT]\ndebug = false\n"
    "[token]\nprovider = fernet\nexpiration = 3600\n"
    "[cache]\nenabled = false\n"
)


def test_replaces_a_key_in_its_section_only() -> None:
    out = set_options(CONF, "token", {"expiration": "15"})
    assert "expiration = 15" in out and "expiration = 3600" not in out
    assert out.replace("expiration = 15", "expiration = 3600") == CONF


def test_adds_missing_keys_at_the_sections_end() -> None:
    out = set_options(CONF, "cache", {"enabled": "true", "backend": "dogpile.cache.memory"})
    assert out.endswith("[cache]\nenabled = true\nbackend = dogpile.cache.memory\n")
    out = set_options(CONF, "DEFAULT", {"use_stderr": "true"})
    assert out.startswith("[DEFAULT]\ndebug = false\nuse_stderr = true\n[token]\n")


def test_a_missing_section_is_an_error() -> None:
    with pytest.raises(ControlPlaneError, match=r"no \[oslo_policy\] section"):
        set_options(CONF, "oslo_policy", {"enforce_scope": "true"})
