"""The state vault on a real ext4 filesystem (a loop device, the kernel's fscrypt) with a
real swtpm: what a person holding the disk reads, and what the node refuses to open.

Unmounting the filesystem drops its keys, as a power cut does: a remount is the next
boot's filesystem."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner import tpm
from provisioner.node import fscrypt, vault
from tests.testbed.node import run_edgepin
from tests.testbed.operator import approve_pcrs, pin_release_key
from tests.testbed.swtpm import Swtpm, forge_nv_index

pytestmark = pytest.mark.integration

PCRS = (7,)
MARKER = b"edgepin-vault-test-guest-console-line-7f3a"


class Disk:
    """An ext4 filesystem with encryption in a file, mounted on <root>/var."""

    def __init__(self, image: Path, root: Path) -> None:
        self.image, self.root, self.var = image, root, root / "var"
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-O", "encrypt", str(image)], check=True)
        self.var.mkdir(parents=True)
        self.mounted = False

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.var)], check=True)
        self.mounted = True

    def power_off(self) -> None:
        subprocess.run(["umount", str(self.var)], check=True)
        self.mounted = False

    def raw(self) -> bytes:
        assert not self.mounted
        return self.image.read_bytes()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path / "state.ext4", tmp_path / "root")
    d.mount()
    yield d
    if d.mounted:
        d.power_off()


def _node_vault(root: Path, swtpm: Swtpm) -> subprocess.CompletedProcess[str]:
    libs = os.environ.get("EDGEPIN_TEST_NODE_PYTHONPATH")
    env = {"EDGEPIN_PCRS": ",".join(map(str, PCRS)), "EDGEPIN_TCTI": swtpm.tcti}
    if libs:
        env["PYTHONPATH"] = libs
    return run_edgepin(["node", "--root", str(root), "vault"], env)


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


def test_the_disk_gives_nothing_without_the_tpm_in_its_measured_state(
    disk: Disk,
    make_swtpm,  # type: ignore[no-untyped-def]
) -> None:
    a = make_swtpm("node")
    var = disk.var
    # what the image build leaves: the provisioner's folder (0711) and cloud-init's data
    (var / "lib" / "edgepin" / "images").mkdir(parents=True)
    (var / "lib" / "edgepin").chmod(0o711)
    (var / "lib" / "cloud" / "seed").mkdir(parents=True)
    (var / "lib" / "cloud" / "seed" / "from-the-image").write_text("kept")
    # a power cut in an earlier first boot left half an encryption behind
    (var / "lib" / "cloud.vault-new").mkdir()
    (var / "lib" / "cloud.vault-new" / "half").write_text("gone")

    r = _node_vault(disk.root, a)
    assert r.returncode == 0, r.stderr
    assert "made in the TPM now" in r.stdout, r.stdout
    for folder in vault.VAULT_DIRS:
        assert folder in r.stdout, r.stdout
    with tpm.Tpm.open(a.tcti) as t:
        key = t.vault_key_read(PCRS)
    assert key is not None and len(key) == 64
    identifier = fscrypt.add_key(var / "lib", key)
    for folder in vault.VAULT_DIRS:
        assert fscrypt.policy_identifier(disk.root / folder) == identifier, folder
    assert (var / "lib" / "edgepin").stat().st_mode & 0o777 == 0o711
    assert (var / "lib" / "edgepin" / "images").is_dir()
    assert (var / "lib" / "cloud" / "seed" / "from-the-image").read_text() == "kept"
    assert not (var / "lib" / "cloud.vault-new").exists()

    # the node at work: its ledger and the guest's console in the vault
    (var / "lib" / "edgepin" / "node.json").write_bytes(b'{"marker": "' + MARKER + b'"}')
    (var / "log" / "edgepin" / "guest-serial.log").write_bytes(MARKER + b"\n")
    disk.power_off()

    raw = disk.raw()
    for secret in [MARKER, b"node.json", b"guest-serial.log", *_forms(key)]:
        assert secret not in raw, secret[:20]

    # the disk in another machine: another TPM holds no key; nothing is opened or changed
    disk.mount()
    other = make_swtpm("thief")
    r = _node_vault(disk.root, other)
    assert r.returncode == 10, (r.stdout, r.stderr)
    assert "encrypted under a key this TPM does not hold" in r.stderr, r.stderr
    assert "node.json" not in os.listdir(var / "lib" / "edgepin")
    with tpm.Tpm.open(other.tcti) as t:
        assert t.vault_key_read(PCRS) is None  # it made no key either

    # the node's own TPM in another measured state: refused
    with tpm.Tpm.open(a.tcti) as t:
        t.extend_pcr(7, b"another boot loader")
    r = _node_vault(disk.root, a)
    assert r.returncode == 10 and "measured boot state differs" in r.stderr, r.stderr
    assert "node.json" not in os.listdir(var / "lib" / "edgepin")

    # the next boot in the measured state opens it, and changes nothing
    a.power_cycle()
    r = _node_vault(disk.root, a)
    assert r.returncode == 0 and "folders encrypted now: none" in r.stdout, (r.stdout, r.stderr)
    assert MARKER in (var / "lib" / "edgepin" / "node.json").read_bytes()
    assert (var / "log" / "edgepin" / "guest-serial.log").read_bytes() == MARKER + b"\n"


def test_an_enrolled_node_refuses_a_vault_changed_offline(
    disk: Disk,
    swtpm: Swtpm,
) -> None:
    var = disk.var
    assert vault.open_vault(disk.root, swtpm.tcti, PCRS).made_key
    (var / "lib" / "edgepin" / "node.json").write_text("{}")
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.anchor_define(list(PCRS))  # enrolled
    disk.power_off()

    # offline, without the key: the guest's log folder replaced by a plain one with a file
    disk.mount()
    shutil.rmtree(var / "log" / "edgepin")  # the kernel lets anyone delete what it cannot read
    (var / "log" / "edgepin").mkdir()
    (var / "log" / "edgepin" / "planted").write_text("read me")
    with pytest.raises(vault.VaultError, match="changed offline"):
        vault.open_vault(disk.root, swtpm.tcti, PCRS)
    # a vault folder removed altogether is made again, empty and encrypted
    shutil.rmtree(var / "log" / "edgepin")
    opened = vault.open_vault(disk.root, swtpm.tcti, PCRS)
    assert opened.encrypted_now == ("var/log/edgepin",)
    assert (var / "lib" / "edgepin" / "node.json").read_text() == "{}"

    # an enrolled node whose TPM lost the vault key (cleared, or the index removed)
    disk.power_off()
    disk.mount()
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t._nv_remove(tpm.VAULT_KEY)
    with pytest.raises(vault.VaultError, match="does not hold"):
        vault.open_vault(disk.root, swtpm.tcti, PCRS)


def test_a_vault_key_index_that_is_not_edgepins_is_refused(disk: Disk, swtpm: Swtpm) -> None:
    """Someone who boots another system on the machine defines the index first, with an
    authorization they know: the node makes no key in it."""
    with tpm.Tpm.open(swtpm.tcti) as t:
        forge_nv_index(t, tpm.VAULT_NV_INDEX, tpm.VAULT_KEY_SIZE)
    with pytest.raises(vault.VaultError, match="not the one this node defined"):
        vault.open_vault(disk.root, swtpm.tcti, PCRS)
    for folder in vault.VAULT_DIRS:
        assert not (disk.root / folder).exists(), folder


def test_a_vault_sealed_with_a_release_key_opens_after_an_approved_boot_chain_only(
    disk: Disk, swtpm: Swtpm, tmp_path: Path
) -> None:
    """`edgepin node vault` on an image that pins a release key: the vault key opens in the
    state it was made in, in a state the key approved, and in no other."""
    key, _pub = pin_release_key(disk.root, tmp_path)
    r = _node_vault(disk.root, swtpm)
    assert r.returncode == 0 and "made in the TPM now" in r.stdout, (r.stdout, r.stderr)
    (disk.var / "lib" / "edgepin" / "node.json").write_bytes(MARKER)
    states = json.loads((disk.var / "lib" / "edgepin-host" / "sealed-states.json").read_text())
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert states == [tpm.release_policy_digest(t.read_pcrs(PCRS), 0).hex()]
    disk.power_off()

    # a host update: the boot chain measures something else; without its approval the
    # vault stays shut and the console says which values to approve
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.extend_pcr(7, b"release 2's boot chain")
        release_2 = t.read_pcrs(PCRS)
    disk.mount()
    r = _node_vault(disk.root, swtpm)
    assert r.returncode == 10 and "none of the 0 signed PCR policies" in r.stderr, r.stderr
    assert "edgepin release approve" in r.stderr and release_2[7].hex() in r.stderr, r.stderr
    assert "node.json" not in os.listdir(disk.var / "lib" / "edgepin")

    # an approval by another key is no approval
    approvals = disk.var / "lib" / "edgepin-host" / "approvals"
    approvals.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    other_key, _ = pin_release_key(other, other)
    approve_pcrs(other_key, release_2, approvals / "forged.json")
    r = _node_vault(disk.root, swtpm)
    assert r.returncode == 10 and "not signed by the pinned release key" in r.stderr, r.stderr

    # the release key's approval of release 2: the same vault opens, nothing made anew
    (approvals / "forged.json").unlink()
    approve_pcrs(key, release_2, approvals / "release-2.json")
    r = _node_vault(disk.root, swtpm)
    assert r.returncode == 0 and "folders encrypted now: none" in r.stdout, (r.stdout, r.stderr)
    assert "made in the TPM now" not in r.stdout
    assert (disk.var / "lib" / "edgepin" / "node.json").read_bytes() == MARKER
    disk.power_off()

    # release 1 again (a rollback of the host): the state it was sealed in still opens it
    swtpm.power_cycle()
    disk.mount()
    r = _node_vault(disk.root, swtpm)
    assert r.returncode == 0, r.stderr
