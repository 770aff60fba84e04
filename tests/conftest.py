"""The fixtures of the test suite; what they hand out lives in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tests.helpers import ZOO, loop_reference


@pytest.fixture
def reference() -> Callable[..., dict[str, Tensor]]:
    """The per-sample loop of ``torch.autograd.grad``: ``reference(module, labels, args, kwargs=None)``."""
    return loop_reference


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request):
    """``(name, model in eval mode, args, targets, labels)`` for each model of ``ZOO``, from seed 0."""
    make_model, make_args, targets, labels = ZOO[request.param]
    torch.manual_seed(0)
    model = make_model().eval()
    return request.param, model, make_args(), targets, labels
