"""The image tier: the built host image, booted in QEMU like a field node."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import cli_env, operator_env, signer  # noqa: F401  (shared fixtures)
from tests.testbed.hostcheck import CheckedBoot, check_boot
from tests.testbed.hostimage import (
    REPO,
    HostImageError,
    ImageSigner,
    build_image,
    image_args,
    image_signer_material,
)
from tests.testbed.swtpm import SwtpmFactory


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """Serial logs and boot timelines of the image tests; kept after the run."""
    path = Path(os.environ.get("EDGEPIN_RESULTS_DIR", REPO / "out" / "results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def image_signer(cache_dir: Path) -> ImageSigner:
    return image_signer_material(cache_dir)


@pytest.fixture(scope="session")
def host_image(cache_dir: Path, image_signer: ImageSigner) -> Path:
    """The host image the tests boot: built by ./build.sh image when its inputs changed."""
    explicit = os.environ.get("EDGEPIN_HOST_IMAGE")
    if explicit:
        return Path(explicit)
    try:
        return build_image(cache_dir / "image-tier" / "out", image_args(image_signer))
    except HostImageError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def vm_tpms(run_dir: Path) -> Iterator[SwtpmFactory]:
    factory = SwtpmFactory(run_dir / "vm-tpm")
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def checked_boot(
    host_image: Path, vm_tpms: SwtpmFactory, run_dir: Path, results_dir: Path
) -> Callable[[str], CheckedBoot]:
    """The check boot on a firmware (tests/testbed/hostcheck.py), booted once per session:
    ``test_host_image.py`` reads its answers, the node tier the PCR values it printed."""
    done: dict[str, CheckedBoot] = {}

    def boot(firmware: str) -> CheckedBoot:
        if firmware not in done:
            done[firmware] = check_boot(firmware, host_image, vm_tpms, run_dir, results_dir)
        return done[firmware]

    return boot


# Scenarios that live one after the other on one node (a module with INCREMENTAL = True):
# once one fails, the rest fail at once, naming it, instead of each waiting out its timeout
# on a node in an unknown state.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    module = getattr(item, "module", None)
    if getattr(module, "INCREMENTAL", False) and report.failed and item.parent is not None:
        item.parent.stash.setdefault(_FAILED, item.name)  # the first failure is the cause
    return report


_FAILED = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    module = getattr(item, "module", None)
    if getattr(module, "INCREMENTAL", False) and item.parent is not None:
        failed = item.parent.stash.get(_FAILED, None)
        if failed is not None:
            pytest.fail(f"not run: the node is in no known state since {failed} failed")
