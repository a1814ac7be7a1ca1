import os
import sys

import pytest
import torch
from helpers import NO_NATIVE_BF16_FLAGS, REFERENCE, REFERENCE_SKIP, ROOT, make_trainer

# Fixtures and hooks only; what test files share is in helpers.py.
sys.path.insert(0, ROOT)

# Tiny tensors: one thread avoids oversubscription when other processes share the cores.
torch.set_num_threads(1)
# No test reaches the internet: downloads of published models (models.pretrained) go to a port nobody
# listens on, unless a test starts its own 127.0.0.1 server (tests/test_pretrained.py).
os.environ["COIC_WEIGHTS_URL"] = "http://127.0.0.1:9/no-downloads-in-tests"
# No test depends on the host's CPU: the suite (and every command it starts) sees a CPU without native
# bf16 (utils.eval.precision.cpu_flags reads $COIC_CPU_FLAGS before /proc/cpuinfo). Tests of the other answer
# set the variable themselves (tests/test_host_independence.py).
os.environ["COIC_CPU_FLAGS"] = NO_NATIVE_BF16_FLAGS
# TorchInductor (the --compile tests) compiles in this process: its default pool of compile workers would
# start and import torch once more per worker, which costs more than the few tiny kernels take to build.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml's addopts): one worker per core this process may use, at most 8 (each
    worker imports torch and builds the session fixtures; a few tests hold over 1 GB). None for one test
    file named on the command line (workers would only add their start and build its module fixtures
    twice; ``-n 2`` asks for them) and under mutmut (tools/mutate.py), which records in its own process
    which tests reach which function."""
    if "mutmut" in sys.modules or "MUTANT_UNDER_TEST" in os.environ:
        return 0
    files = {str(arg).split("::")[0] for arg in config.args}
    if len(files) == 1 and files.pop().endswith(".py"):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def pytest_terminal_summary(terminalreporter) -> None:
    """Say in the summary when the comparisons with the published code did not run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if REFERENCE_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} published-reference tests SKIPPED: {os.path.normpath(REFERENCE)} is absent "
            "(published checkpoints and outputs); nothing was compared with the published code", yellow=True)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> str:
    """A small copy of the demo data (same generator, tiny pictures)."""
    from utils.data.demo import build_demo_data

    root = str(tmp_path_factory.mktemp("demo") / "demo_data")
    return build_demo_data(root, train_per_source=1, train_size=32, test_size=40)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_demo) -> str:
    """The last checkpoint of one tiny BRN CoIC run on ``tiny_demo``'s heavy rain (3 iterations, CoIC from
    iteration 1), trained once per test process for every test that only reads a trained checkpoint.
    Tests must not write into its folder: copy it first."""
    save = tmp_path_factory.mktemp("tiny_run")
    return make_trainer(save, os.path.join(tiny_demo, "heavy", "train"), tot_iters=3, stage1_iters=1).train()
