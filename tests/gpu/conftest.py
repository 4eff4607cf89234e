"""GPU checks (issue #12, item 3): every test here is marked ``gpu`` and skipped where
``torch.cuda.is_available()`` is False, so CI on CPUs collects and skips them.

The trainer_core fixtures (the tiny model, the data files) are shared from that folder's
conftest rather than copied.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer_core.conftest import (  # noqa: F401 -- fixtures, used by name
    facts_file,
    pair_files,
    prompts_file,
    tiny_model,
    tokenizer,
)

HERE = "tests/gpu/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``gpu`` and ``slow``; skip them all without CUDA."""
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE not in item.nodeid:
            continue
        item.add_marker(pytest.mark.gpu)
        item.add_marker(pytest.mark.slow)
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
