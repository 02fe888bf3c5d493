import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def demo_shards() -> dict[str, Path]:
    from moco_scale.data.demo import ensure_demo_shards

    return ensure_demo_shards()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Many tiny ops: on a busy box, a second OpenMP thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
