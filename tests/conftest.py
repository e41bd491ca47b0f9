# The Triton interpreter must be selected before triton (or flashlight) is imported:
# this is what lets CI run the generated kernels on CPU.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
