import os
import sys

# zoo.py and other shared test helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config):
    # `-n auto`: one worker per core, at most four (each holds torch, compiled graphs and models).
    return max(1, min(4, _cores()))


# Under pytest-xdist each worker takes its share of the cores: two workers that each start an
# OpenMP team as wide as the machine would fight over the same cores at every parallel region.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    import torch

    torch.set_num_threads(max(1, _cores() // _workers))
