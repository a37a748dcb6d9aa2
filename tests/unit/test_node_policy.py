"""The node's policy files, read as untrusted input from the state partition: the release
key's approvals and the recorded PCR branches (provisioner.node.policy)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from provisioner import tpm
from provisioner.node import policy
from provisioner.node.config import NodeConfig
from tests.unit.fakes import json_values

pytestmark = pytest.mark.unit

KEY = ec.generate_private_key(ec.SECP256R1())
PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def node_root(tmp: Path, release_key: bool = True) -> NodeConfig:
    cfg = NodeConfig(root=tmp, pcrs=(7,))
    if release_key:
        cfg.release_key_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.release_key_path.write_bytes(PEM)
    return cfg


@given(st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_recorded_states_are_digests_or_nothing(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = node_root(Path(d))
        cfg.sealed_states_path.parent.mkdir(parents=True)
        cfg.sealed_states_path.write_bytes(raw)
        states = policy.sealed_states(cfg)
    assert all(isinstance(s, bytes) and len(s) == 32 for s in states)
    assert len(states) <= policy.MAX_STATES


def test_the_node_policy_holds_what_its_files_say(tmp_path: Path) -> None:
    assert policy.node_policy(node_root(tmp_path / "plain", release_key=False)) == (7,)
    cfg = node_root(tmp_path / "signed")
    good = tpm.sign_approval(KEY, {7: bytes(32)})
    cfg.approvals_dir.mkdir(parents=True)
    (cfg.approvals_dir / "good.json").write_bytes(good)
    (cfg.approvals_dir / "garbage.json").write_bytes(b"\x00not an approval")
    (cfg.approvals_dir / "ignored.txt").write_bytes(good)
    branch = bytes(range(32))
    cfg.sealed_states_path.write_text(json.dumps([branch.hex(), "zz" * 32, 7]))
    got = policy.node_policy(cfg)
    assert isinstance(got, tpm.SignedPolicy)
    assert got.release_key_pem == PEM and got.pcrs == (7,)
    assert got.approvals == (tpm.parse_approval(good),)
    assert got.branches == ()  # one entry is not hex: the file is not trusted at all
    cfg.sealed_states_path.write_text(json.dumps([branch.hex(), 7]))
    assert policy.node_policy(cfg).branches == (branch,)  # type: ignore[union-attr]


def test_a_pinned_release_key_that_is_no_p256_key_is_an_error(tmp_path: Path) -> None:
    cfg = node_root(tmp_path)
    cfg.release_key_path.write_bytes(
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(tpm.TpmBlobError, match="release key"):
        policy.node_policy(cfg)
