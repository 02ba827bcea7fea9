"""gpu_check.sh part 1: a pytest plugin (`-p cudaprobe`) listing which tests allocated CUDA memory (in this
process; subprocess tests are not seen)."""

import pytest
import torch

_used = []


def _allocs():
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if torch.cuda.is_available() else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _allocs()
    yield
    n = _allocs() - before
    if n:
        _used.append((item.nodeid, n))


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("CUDA use per test (allocations in setup+call+teardown)")
    if not torch.cuda.is_available():
        tr.write_line("no CUDA device: nothing can be counted")
        return
    for nodeid, n in _used:
        tr.write_line(f"{n:8d}  {nodeid}")
    tr.write_line(f"{len(_used)} tests allocated CUDA memory; peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
