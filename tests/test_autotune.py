"""repkernels._autotune: the measured choice of ``auto`` (timer injected: the logic runs without a GPU)."""

from __future__ import annotations

import pytest
import torch

from repkernels import _autotune


@pytest.fixture(autouse=True)
def fresh_cache():
    _autotune.clear()
    yield
    _autotune.clear()


def fake_timer(costs, calls):
    def timer(step):
        step()
        return costs[calls[-1]]
    return timer


def run_recorder(calls, fail=()):
    def run(which, x, w, b):
        calls.append(which)
        if which in fail:
            raise RuntimeError(f"{which} cannot")
        return x * w.sum()
    return run


def test_picks_the_fastest_and_caches_it():
    calls = []
    x, w = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3)
    costs = {"reference": 2.0, "cuda": 1.0, "triton": 3.0}
    pick = _autotune.choose("op", x, w, None, (1,), list(costs), run_recorder(calls), fake_timer(costs, calls))
    assert pick == "cuda" and set(calls) == set(costs)
    calls.clear()
    assert _autotune.choose("op", x, w, None, (1,), list(costs), run_recorder(calls), fake_timer(costs, calls)) == "cuda"
    assert calls == [], "a cached problem is not timed again"
    assert list(_autotune.choices().values()) == ["cuda"]


def test_training_problems_are_timed_forward_and_backward_separately():
    calls = []
    x, w = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3, requires_grad=True)
    costs = {"reference": 1.0, "triton": 2.0}
    grads = []

    def run(which, xx, ww, b):
        calls.append(which)
        out = xx * ww.sum()
        if out.requires_grad:
            out.register_hook(lambda g: grads.append(which))
        return out

    assert _autotune.choose("op", x, w, None, (), list(costs), run, fake_timer(costs, calls)) == "reference"
    assert set(grads) == set(costs), "with grad-requiring inputs the backward is part of what is timed"
    with torch.no_grad():
        costs2 = {"reference": 5.0, "triton": 2.0}
        assert _autotune.choose("op", x, w, None, (), list(costs2), run, fake_timer(costs2, calls)) == "triton"
    assert len(_autotune.choices()) == 2, "inference and training are different problems"


def test_a_failing_candidate_is_skipped_and_shapes_key_the_cache():
    calls = []
    costs = {"reference": 2.0, "cuda": 1.0}
    run = run_recorder(calls, fail=("cuda",))
    x, w = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3)
    assert _autotune.choose("op", x, w, None, (), list(costs), run, fake_timer(costs, calls)) == "reference"
    x2 = torch.randn(1, 3, 4, 4)
    assert _autotune.choose("op", x2, w, None, (), ["cuda", "reference"], run_recorder(calls),
                            fake_timer(costs, calls)) == "cuda"


def test_switch():
    _autotune.set_enabled(False)
    try:
        assert not _autotune.enabled()
    finally:
        _autotune.set_enabled(True)
    assert _autotune.enabled()
