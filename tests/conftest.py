import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")

# Tiny tensors: one thread avoids oversubscription when other processes share the cores.
torch.set_num_threads(1)
# No test reaches the internet: downloads of published models (utils.pretrained) go to a port nobody
# listens on, unless a test starts its own 127.0.0.1 server (tests/test_pretrained.py).
os.environ["COIC_WEIGHTS_URL"] = "http://127.0.0.1:9/no-downloads-in-tests"
# No test depends on the host's CPU: the suite (and every command it starts) sees a CPU without native
# bf16 (utils.speed.cpu_flags reads $COIC_CPU_FLAGS before /proc/cpuinfo). Tests of the other answer
# set the variable themselves (tests/test_host_independence.py).
NO_NATIVE_BF16_FLAGS = "fpu sse2 avx avx2 fma"
NATIVE_BF16_FLAGS = NO_NATIVE_BF16_FLAGS + " avx512f avx512_bf16"
os.environ["COIC_CPU_FLAGS"] = NO_NATIVE_BF16_FLAGS


REFERENCE_SKIP = "published reference folder absent"


def reference_file(name: str) -> str:
    """Path of a published reference file.

    Skips the test only when the whole folder is absent (a clean checkout without
    ``../shared``); a folder that is there but lacks the file is a failure, not a skip.
    """
    if not os.path.isdir(REFERENCE):
        pytest.skip(f"{REFERENCE_SKIP}: {os.path.normpath(REFERENCE)}")
    path = os.path.join(REFERENCE, name)
    if not os.path.isfile(path):
        pytest.fail(f"{name} is missing from {os.path.normpath(REFERENCE)} (its README lists the files)")
    return path


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
    from utils.demo_data import build_demo_data

    root = str(tmp_path_factory.mktemp("demo") / "demo_data")
    return build_demo_data(root, train_per_source=1, train_size=32, test_size=40)


def train_flags(save_path: str, data_paths: str, **overrides) -> list[str]:
    """Tiny but complete training flags (every code path, seconds on a CPU): the recipe's ``--tiny``
    model, batch and crop, and a short run; ``overrides`` are typed flags and win over ``--tiny``."""
    flags = dict(data_paths=data_paths, save_path=save_path, tot_iters=6, stage1_iters=3, num_workers=0,
                 save_freq=2, log_freq=1, image_freq=3, n_neg=2)
    flags.update(overrides)
    return ["--tiny"] + [item for k, v in flags.items() for item in (f"--{k}", str(v))]


# Shared by the backbone tests.
def unit_codes(batch: int, dim: int, seed: int) -> torch.Tensor:
    """(batch, dim) unit vectors, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)


def image(seed: int = 1, size: int = 16) -> torch.Tensor:
    """(2, 3, size, size) in [0, 1], reproducible from ``seed``."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def scramble_generators(model: torch.nn.Module, std: float = 0.5) -> None:
    """Give every CoI-M generator large random weights (the default init is near-neutral)."""
    from models.coim import modulation_parameters

    with torch.no_grad():
        for p in modulation_parameters(model):
            p.normal_(0.0, std)
