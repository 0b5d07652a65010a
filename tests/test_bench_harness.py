"""The bench harness reports a failing case and goes on: a float64 reference that cannot be computed (the
float64 model of a large batch does not fit in GPU memory), an implementation or a setup that raises."""

from __future__ import annotations

import torch
from repkernels.bench import harness


def _case(name, setup):
    return harness.Case("op", name, torch.float32, setup, flops=1.0, bytes=1.0)


def test_harness_reports_failures_and_continues():
    x = torch.arange(4.0)

    def broken_reference(device, small):
        def reference():
            raise RuntimeError("CUDA out of memory (simulated)")
        return {"reference": lambda: x * 2}, reference

    def one_impl_fails(device, small):
        def fails():
            raise ValueError("bad kernel")
        return {"reference": lambda: x * 2, "triton": fails, "cuda": lambda: x * 2 + 1}, lambda: (x * 2).double()

    def broken_setup(device, small):
        raise MemoryError("inputs do not fit")

    records = harness.run_cases([_case("a", broken_reference), _case("b", one_impl_fails), _case("c", broken_setup),
                                 _case("d", one_impl_fails)], quick=True)
    by = {(r["case"], r["impl"]): r for r in records}
    assert by[("a", "reference")]["check"] == "unchecked"
    assert "float64 reference failed" in by[("a", "reference")]["error"]
    assert "out of memory" in by[("a", "reference")]["error"]
    assert by[("b", "reference")]["check"] == "ok"
    assert by[("b", "triton")]["check"] == "ERROR" and "bad kernel" in by[("b", "triton")]["error"]
    assert by[("b", "cuda")]["check"] == "FAIL"
    assert by[("c", "(setup)")]["check"] == "ERROR" and "do not fit" in by[("c", "(setup)")]["error"]
    assert by[("d", "reference")]["check"] == "ok"        # the cases after the failures still run
    table = harness.format_table(records, None)
    assert "float64 reference failed" in table and "bad kernel" in table
