"""The thread tuner against simulated step times: a quiet machine and a loaded one."""

from __future__ import annotations

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
