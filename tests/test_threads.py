"""The thread tuner against simulated step times (a quiet machine and a loaded one), and the
allocator setting that keeps a step's freed memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from promptmesh.backend.threads import ThreadTuner


def simulate(step_seconds: dict[int, float], steps: int = 1200) -> tuple[ThreadTuner, float, list[int]]:
    """Run the tuner for `steps` steps whose time depends only on the thread count in force."""
    current = {"n": 0}
    tuner = ThreadTuner(max_threads=2, set_threads=lambda n: current.update(n=n))
    total, history = 0.0, []
    for _ in range(steps):
        seconds = step_seconds[current["n"]]
        total += seconds
        history.append(current["n"])
        tuner.step(seconds)
    return tuner, total, history


def test_on_a_quiet_machine_it_keeps_every_core_and_probing_costs_little():
    tuner, total, history = simulate({1: 0.089, 2: 0.064})  # measured here: embedded default, quiet
    assert tuner.threads == 2
    assert total < 1.05 * 1200 * 0.064 and history.count(1) < 40


def test_beside_a_competing_process_it_drops_to_one_thread_and_stays_near_its_speed():
    tuner, total, history = simulate({1: 0.083, 2: 1.356})  # measured here: one busy process beside it
    assert tuner.threads == 1 and history[-100:] == [1] * 100
    # two-thread steps: the first 8 before the first probe, then one step per (ever rarer) probe
    assert history.count(2) <= 8 + 6
    assert total / (1200 * 0.083) < 1.25  # far within the 3x budget


def test_it_follows_a_load_that_comes_and_goes():
    current = {"n": 0}
    tuner = ThreadTuner(max_threads=2, set_threads=lambda n: current.update(n=n))
    for phase, times in ((400, {1: 0.083, 2: 1.356}), (1600, {1: 0.089, 2: 0.064})):
        for _ in range(phase):
            tuner.step(times[current["n"]])
        expected = 1 if times[2] > times[1] else 2
        assert tuner.threads == expected


def test_one_core_never_probes():
    calls: list[int] = []
    tuner = ThreadTuner(max_threads=1, set_threads=calls.append)
    for _ in range(500):
        tuner.step(0.1)
    assert calls == [1] and tuner.threads == 1


FAULTS = """
import ctypes, resource, sys, torch
from promptmesh.backend.field import FieldConfig, NeRFField
from promptmesh.backend.process import M_TRIM_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
else:  # the trap: a trim threshold alone freezes glibc's mmap threshold at 128 KB
    ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 256 << 20)
torch.set_num_threads(1)
field = NeRFField(FieldConfig())
x = torch.rand(60000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
def step():
    density, albedo = field(x)
    (density.sum() + albedo.sum()).backward()
    field.zero_grad(set_to_none=True)
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
FINEST_GRADIENT_PAGES = (23 << 20) // 4096  # the finest hash-grid level's gradient buffer, in 4 KB pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_keeps_the_steps_buffers_instead_of_faulting_them_in_again():
    """Against the trap, not glibc's defaults: those adapt their mmap threshold as the heap goes and
    fault in from none to most of a step's buffers, run to run (measured here 6k-13k over these six
    steps); bench/sds_speed.py prints the faults per step of a real run."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("keep", "trap")}
    # measured here over the six steps: keep 0-2.3k, the trap 82-88k (every buffer over 128 KB mapped afresh)
    assert faults["keep"] < 0.25 * faults["trap"], faults
    # and all six steps together fault in less than the one buffer that glibc's defaults can return each step
    assert faults["keep"] < FINEST_GRADIENT_PAGES, faults
