"""The test suite, a package: its modules import what they share from ``tests.helpers``, never from each other.

``engine/``: the torch-only engine; ``monitor/``: the callback in a real Trainer; ``end_to_end/``: examples, the CLI,
multi-process runs and the shape of the package."""

import pytest

pytest.register_assert_rewrite("tests.helpers")  # its assertions report values as a test module's do
