"""utils.host.available_memory: MemAvailable, capped by a cgroup v2 limit; the one answer the image
cache and the tile planner both use."""
import torch

import datasets
import utils.eval.memory
import utils.host
from utils.host import available_memory

GIB = 1 << 30


def _tree(tmp_path, available_kib, limit=None, current=None):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text(f"MemTotal:       33554432 kB\nMemFree:         1000 kB\n"
                                  f"MemAvailable:   {available_kib} kB\n")
    if limit is not None:
        (cgroup / "memory.max").write_text(f"{limit}\n")
        (cgroup / "memory.current").write_text(f"{current}\n")
    return str(proc), str(cgroup)


def test_meminfo_without_a_limit(tmp_path):
    proc, cgroup = _tree(tmp_path, 8 * 1024 * 1024)  # 8 GiB in KiB
    assert available_memory(proc, cgroup) == 8 * GIB


def test_unlimited_cgroup_keeps_meminfo(tmp_path):
    proc, cgroup = _tree(tmp_path, 8 * 1024 * 1024, "max", 5 * GIB)
    assert available_memory(proc, cgroup) == 8 * GIB


def test_a_cgroup_limit_below_the_host_wins(tmp_path):
    proc, cgroup = _tree(tmp_path, 8 * 1024 * 1024, 3 * GIB, 1 * GIB)
    assert available_memory(proc, cgroup) == 2 * GIB  # 3 GiB limit - 1 GiB in use


def test_a_cgroup_limit_above_the_host_does_not_raise_it(tmp_path):
    proc, cgroup = _tree(tmp_path, 4 * 1024 * 1024, 64 * GIB, 1 * GIB)
    assert available_memory(proc, cgroup) == 4 * GIB


def test_cache_and_tile_planner_ask_the_same_helper(monkeypatch):
    monkeypatch.setattr(utils.eval.memory, "host_available_memory", lambda: 123 * GIB)
    assert utils.eval.memory.available_memory(torch.device("cpu")) == 123 * GIB
    assert datasets.available_memory is utils.host.available_memory
