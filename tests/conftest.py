import os
import sys

# zoo.py and other shared test helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter child suites
    from interpreter_speedup import skip_dropped_overflow_checks, skip_nested_lang_patches

    skip_nested_lang_patches()
    skip_dropped_overflow_checks()


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


# Longest first, so that pytest-xdist's workers finish together: with --dist loadfile a worker
# takes whole files in collection order, and these spend minutes in one interpreter or compiler
# child process each (measured on a 2-core CI machine, 2026-11-27).
_LONGEST_FIRST = ("test_triton_integration.py", "test_kernel_resources.py", "test_head_linear.py",
                  "test_triton_decode.py", "test_triton_forward_variants.py", "test_api.py", "test_triton_kernel.py",
                  "test_triton_gather_heads.py", "test_real_model.py", "test_distill.py", "test_checkpoint.py")


def pytest_configure(config):
    # xdist would otherwise queue files by test count, most first; ours go longest first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
