"""utils.allocator: with keep_freed_memory a repeated BRN forward reuses its heap pages; without
it (glibc's default) every large activation is mapped and zero-filled again, page by page."""
import json
import os
import subprocess
import sys

import pytest
from contract import tiny_args
from helpers import ROOT

SIZE = 512

# Runs in a fresh process, so that the allocator starts from glibc's defaults
# (argv: keep or default, hparams as JSON, image side, forwards).
CHILD = r"""
import ctypes, json, resource, sys
# No transparent huge pages: faults are then counted in base pages whatever the host's THP setting.
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
keep, hparams, size, calls = sys.argv[1] == "keep", json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import torch
torch.set_num_threads(1)
if keep:
    from utils.allocator import keep_freed_memory
    keep_freed_memory()
from models import build_model
model = build_model("BRN", **hparams).eval()
x = torch.rand(1, 3, size, size)
faults = []
with torch.inference_mode():
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def activation_pages(hparams: dict, size: int) -> int:
    """Pages that one plain forward's (1, width, size, size) float32 tensors occupy, counted from
    ``models/brn.py`` (convolution workspaces not included, so a lower bound).

    Per branch: conv0 and its ReLU (2), the LSTM input cat (3 widths), four gate convs and their
    activations (8), the cell update f*c, i*g, +, tanh, o*(.) (5), per residual block two convs,
    two ReLUs, the skip sum and its ReLU (6). Rain branch 3 blocks, image branch 5, plus the zero
    state; ``inter_iter`` times.
    """
    per_branch = 2 + 3 + 8 + 5
    features = 1 + hparams["inter_iter"] * (2 * per_branch + 6 * (3 + 5))
    feature_bytes = hparams.get("width", 32) * size * size * 4
    return features * feature_bytes // os.sysconf("SC_PAGE_SIZE")


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(),
                    reason="keep_freed_memory tunes glibc's malloc; this C library is not glibc")
@pytest.mark.slow  # end to end, 15-55 s: `pytest -m ""` and CI run it
def test_kept_memory_removes_page_faults_of_repeated_forwards():
    hparams = tiny_args("BRN").model_hparams
    # Each feature map must be above glibc's largest dynamic mmap threshold (32 MiB), or glibc's
    # default would keep it in the heap too and the test would tell nothing.
    assert hparams.get("width", 32) * SIZE * SIZE * 4 >= 32 * 2 ** 20
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    # The first forward grows the kept heap, so the kept process is judged on its 2nd and 3rd.
    # glibc's default faults as much on every forward: the 2nd is enough (a 3rd costs ~5 s).
    # Both processes at once: each is one thread.
    procs = {mode: subprocess.Popen([sys.executable, "-c", CHILD, mode, json.dumps(hparams), str(SIZE), str(calls)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode, calls in (("keep", 3), ("default", 2))}
    faults = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        faults[mode] = json.loads(out.splitlines()[-1])
    pages = activation_pages(hparams, SIZE)
    kept, default = max(faults["keep"][1:]), min(faults["default"][1:])
    assert kept < 0.1 * pages, f"kept: {faults['keep']} faults per forward, activations {pages} pages"
    assert default > pages, f"glibc default: {faults['default']} faults per forward, activations {pages} pages"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_user_settings_are_kept_and_later_calls_change_nothing():
    code = ("import json\nfrom utils.allocator import keep_freed_memory\n"
            "print(json.dumps([keep_freed_memory(), keep_freed_memory({})]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for user, expected in (({}, {"mmap_threshold", "trim_threshold"}),
                           ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"trim_threshold"}),
                           ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}, {"mmap_threshold"})):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **user}, capture_output=True,
                             text=True, check=True).stdout
        first, second = json.loads(out)
        assert set(first) == expected and second == first, (user, first, second)


# Through the C library itself (PyTorch allocates with the same malloc): two 1.1 GB blocks, touched,
# freed in reverse order (so that they merge into the top of the heap, 2.2 GB free), allocated and
# touched again; prints the page faults of the second round (argv: keep or default).
CHILD_TRIM = r"""
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: faults in base pages
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from utils.allocator import keep_freed_memory
    keep_freed_memory()
n = 1100 * 2 ** 20
blocks = [libc.malloc(n) for _ in range(2)]
for b in blocks:
    ctypes.memset(b, 1, n)
for b in reversed(blocks):
    libc.free(b)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [libc.malloc(n) for _ in range(2)]
for b in blocks:
    ctypes.memset(b, 2, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_a_working_set_above_2_gib_is_not_given_back_and_faulted_in_again():
    """A large photo's forward holds more than any int-sized trim threshold (2 GiB): the freed top of
    the heap must stay for the next forward. 2.2 GB freed and allocated again: kept, it costs almost
    no page faults; glibc's default gives it back and faults all of it in again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    pages = 2 * 1100 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    faults = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", CHILD_TRIM, mode], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])
    assert faults["keep"] < 0.01 * pages, faults
    assert faults["default"] > 0.9 * pages, faults
