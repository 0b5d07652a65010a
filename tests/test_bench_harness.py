"""The bench harness reports a failing case and goes on: a float64 reference that cannot be computed (the
float64 model of a large batch does not fit in GPU memory), an implementation or a setup that raises."""

from __future__ import annotations

import os

import pytest
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
    table = harness.format_table(records)
    assert "float64 reference failed" in table and "bad kernel" in table


def _labelled_case(name, dtype=torch.float32, ran="b2 c2 3x3"):
    x = torch.arange(6.0, dtype=dtype)

    def setup(device, small):
        impls = {"static": lambda: x + 1, "reference": lambda: x * 2, "online": lambda: x * 3,
                 "a rather long implementation name (CPU emulation)": lambda: x * 2}
        return impls, lambda: (x * 2).double(), ran
    return harness.Case("some op", name, dtype, setup, flops=1.0, bytes=1.0, baseline="static",
                        unchecked=("static", "legacy"), not_compared={"online": "other semantics: bn_mode='online'"})


def test_labels_baseline_only_for_the_baseline_row_and_n_a_is_not_a_failure():
    records = harness.run_cases([_labelled_case("b64 c512 56x56")], quick=True)
    by = {r["impl"]: r for r in records}
    assert by["static"]["check"] == "baseline" and "reason" not in by["static"]
    assert by["online"]["check"] == "n/a" and by["online"]["reason"] == "other semantics: bn_mode='online'"
    assert by["reference"]["check"] == "ok"
    assert all(r["check"] in harness.PASSING_CHECKS for r in records)
    assert "n/a" in harness.TIMED_CHECKS      # timed on a GPU like the baseline
    # a row listed in unchecked that is not the baseline is "n/a", not "baseline"
    case = _labelled_case("x")
    assert case.not_compared_reason("legacy") == "computes something else"
    assert case.not_compared_reason("static") is None
    table = harness.format_table(records)
    assert "n/a (other semantics: bn_mode='online')" in table
    # the summary of a GPU check does not list n/a rows as failures
    from repkernels.bench import summary

    assert summary._bench_failures({"suite": records}) == []


def test_half_precision_whole_network_steps_are_not_compared():
    from repkernels.bench.suites import kernelwarehouse, multibranch_conv_bn, parcnetv2

    kw_networks = [(kernelwarehouse, net.op) for net in kernelwarehouse.NETWORKS]
    assert {op for _, op in kw_networks} == {"kw_resnet50", "kw_mobilenetv2", "kw_convnext_tiny"}
    for suite, op in [(multibranch_conv_bn, "resnet50 pbconv"), (parcnetv2, "parcnetv2_tiny")] + kw_networks:
        for case in suite.cases([torch.bfloat16], quick=True):
            if case.op == op and "train" in case.name:
                assert case.not_compared, (op, case.name)
                whys = [why for impl, why in case.not_compared.items() if impl != "online"]
                assert whys and all("a bf16 training step of a whole network" in why for why in whys)
                assert case.baseline is None or case.unchecked == (case.baseline,)
    for case in multibranch_conv_bn.cases([torch.float32], quick=True):
        assert case.not_compared == {"online": "other semantics: bn_mode='online'"}
        assert case.unchecked == (case.baseline,)


def test_table_columns_aligned_and_show_the_shape_run():
    records = harness.run_cases([_labelled_case("short"), _labelled_case("a much longer case name b64 c512 56x56",
                                                                          ran="b2 c2 9x10 k13x13")], quick=True)
    lines = harness.format_table(records).splitlines()
    head, rows = lines[0], [ln for ln in lines[2:] if ln.startswith("some op")]
    assert len(rows) == len(records)
    offset = head.index("check")
    assert all(len(ln) > offset and ln[offset - 1] == " " and ln[offset:].split()[0] in harness.PASSING_CHECKS
               for ln in rows), "\n".join(lines)
    ran = head.index("ran")
    assert all(ln[ran:].startswith(("b2 c2 3x3 ", "b2 c2 9x10 k13x13 ")) for ln in rows)
    assert "b2 c2 9x10 k13x13" in records[-1]["ran"] and records[-1]["case"].endswith("56x56")  # the name is kept
    # timed records (GPU): the same alignment, and no "ran" column
    timed = [{**r, "ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1} for r in records]
    tlines = harness.format_table(timed).splitlines()
    toff = tlines[0].index("check")
    assert "ran" not in tlines[0].split()
    assert all(ln[toff:].split()[0] in harness.PASSING_CHECKS for ln in tlines[2:] if ln.startswith("some op"))


def test_plot_written_on_cpu_and_gpu(tmp_path):
    pytest.importorskip("matplotlib")
    records = harness.run_cases([_labelled_case("a"), _labelled_case("b", dtype=torch.bfloat16)], quick=True)
    for r in records:
        r["family"] = "fam"
    records[1].update(check="FAIL", rel_error=float("inf"))
    assert harness.write_plot(tmp_path / "cpu.png", records, "CPU")
    assert (tmp_path / "cpu.png").stat().st_size > 1000
    timed = [{**r, "ms": 1.0, "x_best_torch": 1.5, "torch": r["impl"] == "reference"} for r in records]
    assert harness.write_plot(tmp_path / "gpu.png", timed, "GPU")
    assert (tmp_path / "gpu.png").stat().st_size > 1000
    assert not harness.write_plot(tmp_path / "none.png", [], "CPU")


def test_cli_writes_png_on_cpu(tmp_path):
    pytest.importorskip("matplotlib")
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    from repkernels.bench.__main__ import main

    assert main(["--ops", "kernel_transform", "--quick", "--dtype", "fp32", "--out", str(tmp_path),
                 "--name", "t"]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000 and (tmp_path / "t.json").exists()


@pytest.mark.parametrize("before", [None, "1"])
def test_depthwise_cuda_tiles_switches_toeplitz_off_for_the_call_only(monkeypatch, before):
    from repkernels.bench.suites import depthwise_conv2d as suite
    from repkernels.ops.depthwise_conv2d import TOEPLITZ_ENV

    if before is None:
        monkeypatch.delenv(TOEPLITZ_ENV, raising=False)
    else:
        monkeypatch.setenv(TOEPLITZ_ENV, before)
    seen = []

    def fn(fail=False):
        seen.append(os.environ.get(TOEPLITZ_ENV))
        if fail:
            raise RuntimeError("boom")
        return 7

    assert suite._without_toeplitz(fn)() == 7
    assert os.environ.get(TOEPLITZ_ENV) == before
    with pytest.raises(RuntimeError, match="boom"):
        suite._without_toeplitz(lambda: fn(fail=True))()
    assert seen == ["0", "0"]
    assert os.environ.get(TOEPLITZ_ENV) == before


def test_picks_are_recorded_after_the_first_call_and_never_break_a_row():
    """A setup's fourth element asks a router what it chose, once, after its first call (the choice exists by then);
    a pick that raises is reported on the row, and a row that raised gets no pick."""
    x = torch.arange(4.0)
    calls = []

    def setup(device, small):
        def auto():
            calls.append("auto")
            return x * 2

        def fails():
            raise ValueError("bad kernel")
        impls = {"reference": lambda: x * 2, "auto": auto, "router": lambda: x * 2, "broken": fails}
        picks = {"auto": lambda: {"impl": "reference", "calls": list(calls)},
                 "router": lambda: {}["no such key"], "broken": lambda: {"impl": "never asked"}}
        return impls, lambda: (x * 2).double(), "b1", picks

    by = {r["impl"]: r for r in harness.run_cases([_case("p", setup)], quick=True)}
    assert by["auto"]["pick"] == {"impl": "reference", "calls": ["auto"]} and by["auto"]["check"] == "ok"
    assert "pick" not in by["router"] and "KeyError" in by["router"]["pick_error"] and by["router"]["check"] == "ok"
    assert "pick" not in by["broken"] and by["broken"]["check"] == "ERROR"
    assert "pick" not in by["reference"]


def test_depthwise_pick_names_bench_rows_and_the_rule_per_faster_row():
    from repkernels.bench.suites import depthwise_conv2d as suite

    planner = "csrc/depthwise_conv2d/depthwise_conv2d_toeplitz.h: plan_toeplitz (...)"
    static = {"backend": "triton", "rule": "Toeplitz rule -> Triton", "where": "toeplitz.py: plan",
              "cuda_plan": "Toeplitz GEMMs", "cuda_plan_where": planner}
    autotuned = {"backend": "cuda", "rule": "autotune: ...", "where": "_autotune.py", "static": static,
                 "cuda_plan": "Toeplitz GEMMs", "cuda_plan_where": planner}
    pick = suite.pick_rows(autotuned)
    assert (pick["impl"], pick["detail"], pick["rule"]) == ("cuda", "Toeplitz GEMMs", "autotune: ...")
    assert pick["retune"]["cuda_tiles"] == f"the C++ planner's Toeplitz rule ({planner})"
    assert set(pick["retune"]) == {"cuda_tiles", "torch_channels_last", "torch_compile"}  # not autotune candidates
    assert pick["static"]["impl"] == "triton" and "detail" not in pick["static"]
    assert pick["static"]["retune"] == {"cuda_tiles": f"Toeplitz rule -> Triton (toeplitz.py: plan) and the C++ "
                                                      f"planner's Toeplitz rule ({planner})"}
    tiles = suite.pick_rows({**static, "backend": "cuda", "rule": "other kernels -> CUDA",
                             "cuda_plan": "register tiles"})
    assert tiles["same"] == ["cuda_tiles"] and "retune" not in tiles and tiles["detail"] == "register tiles"
    cudnn = {"backend": "reference", "rule": "K <= CUDNN_MAX_KERNEL (7) -> cuDNN", "where": "w"}
    assert suite.pick_rows(cudnn)["impl"] == "torch_nchw"
    # the planner runs the register tiles anyway: the cuda_tiles row is the cuda row, no rule of its own
    assert "retune" not in suite.pick_rows({**cudnn, "cuda_plan": "register tiles", "cuda_plan_where": planner})
    assert suite.pick_rows(cudnn, channels_last=True)["impl"] == "torch_channels_last"
    unmeasured = suite.pick_rows({**autotuned, "backend": None})
    assert unmeasured["impl"] is None and "detail" not in unmeasured


def test_kernelwarehouse_layer_pick_names_bench_rows():
    from repkernels.bench.suites import kernelwarehouse as suite

    assert suite.layer_pick({"fused": True, "backend": "triton", "rule": "r", "where": "w"}) == \
        {"impl": "triton fused", "rule": "r", "where": "w", "retune": {"triton tma": f"r (w) and {suite.TMA_RETUNE}"}}
    assert suite.layer_pick({"fused": False, "backend": "cuda", "rule": "r", "where": "w"})["impl"] == "cuda"
    # the TMA forward (opt-in): its row when auto ran it, else the switch is the rule that would give it to auto
    assert suite.layer_pick({"fused": False, "backend": "triton", "rule": "r", "where": "w"})["retune"] == \
        {"triton tma": suite.TMA_RETUNE}
    assert suite.layer_pick({"fused": False, "backend": "triton", "rule": "r", "where": "w", "tma": True}) == \
        {"impl": "triton tma", "rule": "r", "where": "w"}
    assert "REPKERNELS_KW_TMA=1" in suite.TMA_RETUNE


def test_depthwise_auto_pick_asks_the_router_with_the_calls_grad_flags(monkeypatch):
    """The auto row's pick (GPU only in the bench) reads the autotuner's choice for the problem auto ran: forward
    and forward+backward apart. Here on CPU tensors, with the GPU simulated."""
    from repkernels import _autotune, _backend
    from repkernels.bench.suites import depthwise_conv2d as suite

    x, wt, b = torch.randn(2, 2, 14, 14), torch.randn(2, 1, 13, 13), torch.randn(2)
    assert suite._auto_pick((x, wt, b), 1, (6, 6), training=False)()["rule"] == "CPU tensors -> reference"
    real = suite._dw_ops.routing_decision
    monkeypatch.setattr(suite._dw_ops, "routing_decision", lambda *a, **k: real(*a, **k, on_gpu=True))
    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda *t: None)
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda *t: None)
    _autotune.clear()
    try:
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, wt, b))
        times = iter([3.0, 1.0, 2.0])                      # cuDNN, cuda, triton: cuda wins
        _autotune.choose("depthwise_conv2d", xg, wg, bg, ((1, 1), (6, 6), (1, 1)), ["reference", "cuda", "triton"],
                         lambda which, xx, ww, bb: xx * ww.sum(), lambda step: next(times))
        fwd_bwd = suite._auto_pick((x, wt, b), 1, (6, 6), training=True)()
        assert (fwd_bwd["impl"], fwd_bwd["detail"], fwd_bwd["static"]["impl"]) == ("cuda", "Toeplitz GEMMs", "triton")
        assert fwd_bwd["rule"].startswith("autotune") and "cuda_tiles" in fwd_bwd["retune"]
        assert suite._auto_pick((x, wt, b), 1, (6, 6), training=False)()["impl"] is None   # forward: not measured
    finally:
        _autotune.clear()
