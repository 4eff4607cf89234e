"""``resources.deterministic``: torch's deterministic algorithms on the CPU by default, off on
CUDA by default, and what the job says when it says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.trainer_core.conftest import MakeSpec
from trainer_core.loop import setup
from trainer_core.placement import deterministic_algorithms
from trainer_core.specs import ResourcesSpec

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=True)


@pytest.mark.parametrize(
    ("asked", "device", "resolved"),
    [
        (None, CPU, True),  # free on the CPU
        (None, CUDA, False),  # ~17% of a step on CUDA
        (False, CPU, False),
        (True, CUDA, True),
    ],
)
def test_the_job_decides_else_the_device(
    asked: bool | None, device: torch.device, resolved: bool
) -> None:
    assert deterministic_algorithms(ResourcesSpec(deterministic=asked), device) is resolved


@pytest.mark.usefixtures("restore_determinism")
def test_setup_switches_torch_on_or_off_as_resolved(make_spec: MakeSpec) -> None:
    assert not torch.cuda.is_available()  # this test runs on the CPU: the default is on
    torch.use_deterministic_algorithms(False)
    setup(make_spec())
    assert torch.are_deterministic_algorithms_enabled()

    setup(make_spec(resources=ResourcesSpec(deterministic=False)))
    assert not torch.are_deterministic_algorithms_enabled()

    setup(make_spec(resources=ResourcesSpec(deterministic=True)))
    assert torch.are_deterministic_algorithms_enabled()
