"""The GPU check (bench/gpu_check.sh) and its parts: the dry run of every stage on this CPU machine, the goals
table, the canary's crash handling, the bench's baselines and roofline columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from repkernels.bench import goals, harness, summary

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
SUITES = ("depthwise_conv2d", "kernelwarehouse", "parcnetv2", "multibranch_conv_bn", "kernel_transform")


def _script(*args, env=None, timeout=1500):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_dry_run_writes_every_result(tmp_path):
    """Every stage runs on CPU and leaves the files a GPU run leaves; the summary lists every goal as unmeasured."""
    out = tmp_path / "results"
    proc = _script("--dry-run", "--archive", str(tmp_path / "results.tgz"), str(out),
                   env={"REPKERNELS_CHECK_SITE": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == ["build", "canary", "tests", "sanitizer"] + [f"bench_{s}" for s in SUITES]
    assert all(s[1] == "0" for s in stages), stages
    for name in ("summary.md", "env.txt", "build.log", "canary.json", "pytest.xml", "sanitizer.txt"):
        assert (out / name).stat().st_size > 0, name
    for suite in SUITES:
        data = json.loads((out / f"bench_{suite}.json").read_text())
        assert data["results"] and data["environment"]["commit"], suite
        assert all(r["check"] in harness.PASSING_CHECKS for r in data["results"]), suite
        assert "check" in (out / f"bench_{suite}.txt").read_text()
    canary = json.loads((out / "canary.json").read_text())["results"]
    assert len(canary) > 20 and all(r["status"] == "ok" for r in canary), canary
    assert any("_triton" in r["case"] for r in canary) and any(r["case"].startswith("per_sample") for r in canary)
    assert "0 path(s) failed" in (out / "sanitizer.txt").read_text()
    env_txt = (out / "env.txt").read_text()
    assert "_C extension    built" in env_txt and str(tmp_path / "site") in env_txt   # the private build
    text = (out / "summary.md").read_text()
    for goal in goals.GOALS:
        assert goal.text in text
    assert "every goal is unmeasured" in text and "None." in text  # no failures
    # no auto row without a GPU: the routing section says so
    assert "## Routing" in text and "No case with an `auto` row next to our own paths" in text
    with tarfile.open(tmp_path / "results.tgz") as tar:
        assert "results/summary.md" in tar.getnames()


def test_usage_errors_exit_2():
    proc = _script("--stages", "benchmark", "--dry-run", timeout=60)
    assert proc.returncode == 2 and "unknown stage 'benchmark'" in proc.stderr
    proc = _script("--suites", "nope", "--dry-run", timeout=60)
    assert proc.returncode == 2 and "unknown suite 'nope'" in proc.stderr


def test_canary_reports_a_crash_and_goes_on(monkeypatch):
    """A child that dies (the GPU image's abort while formatting an error) is reported with its signal and the
    faulthandler trace; a call that returns is a failure; the cases after the crash still run."""
    from repkernels.bench import canary

    monkeypatch.setenv("REPKERNELS_CANARY_SELFTEST", "1")
    results = {r["case"]: r for r in canary.run("cpu")}
    assert results["selftest: raises"]["status"] == "ok"
    assert results["selftest: aborts"]["status"] == "crashed (SIGABRT)"
    assert "Fatal Python error" in results["selftest: aborts"]["detail"]
    assert results["selftest: returns"]["status"] == "no exception"
    assert results["selftest: raises after the crash"]["status"] == "ok"


def _record(case, impl, dtype="float32", op="depthwise_conv2d", **fields):
    return {"op": op, "case": case, "dtype": dtype, "impl": impl, "check": "ok", **fields}


def test_goals_take_the_worst_row_per_dtype():
    g = next(x for x in goals.GOALS if x.text.startswith("depthwise fwd+bwd, K >= 13"))
    rows = [_record("replknet s1 k31 fwd+bwd b64 c128 56x56 k31x31", "auto", pct_roofline=62.0),
            _record("replknet s3 k13 fwd+bwd b64 c512 14x14 k13x13", "auto", pct_roofline=48.0),
            _record("convnext s1 k7 fwd+bwd b64 c96 56x56 k7x7", "auto", pct_roofline=5.0),     # K < 13: not this goal
            _record("replknet s3 k13 fwd b64 c512 14x14 k13x13", "auto", pct_roofline=1.0),      # forward only
            _record("replknet s1 k31 fwd+bwd b64 c128 56x56 k31x31", "triton", pct_roofline=1.0),  # not auto
            _record("replknet s1 k31 fwd+bwd b64 c128 56x56 k31x31", "auto", "bfloat16", pct_roofline=70.0)]
    res = g.evaluate(rows)
    assert res["met"] is False and res["rows"] == 3
    assert "float32: 48.0 %" in res["measured"] and "k13x13" in res["measured"] and "bfloat16: 70.0 %" in res["measured"]
    assert g.evaluate(rows[:1] + rows[5:])["met"] is True
    assert g.evaluate([])["met"] is None
    step = next(x for x in goals.GOALS if x.source == "#12" and "training step" in x.text)
    train = [_record("KW-ResNet-50 train step b64", "auto", "bfloat16", op="kw_resnet50", x_baseline=0.8)]
    assert step.evaluate(train)["met"] is True               # 1 / 0.8 = 1.25x the static time <= 1.4
    train[0]["x_baseline"] = 0.5
    assert step.evaluate(train)["met"] is False and "2.00x" in step.evaluate(train)["measured"]


def test_summary_lists_goals_stages_and_failures(tmp_path):
    records = [_record("parcv2 14 (2h-1)x1 fwd+bwd b64 c320 14x14 k27x1", "auto", x_best_torch=6.0, ms=1.0,
                       pct_roofline=10.0),
               {**_record("parcv2 14 (2h-1)x1 fwd+bwd b64 c320 14x14 k27x1", "triton"), "check": "FAIL"}]
    (tmp_path / "bench_depthwise_conv2d.json").write_text(json.dumps({"environment": {"device": "NVIDIA H200"},
                                                                      "results": records}))
    (tmp_path / "stages.tsv").write_text("build\t0\t30\t150\ntests\t124\t120\t120\n")
    (tmp_path / "canary.json").write_text(json.dumps({"results": [
        {"case": "kw_assemble_triton: x", "status": "crashed (SIGABRT)", "detail": "free(): invalid pointer"}]}))
    text = summary.summarize(tmp_path)
    oversized = next(line for line in text.splitlines() if "ParCNetV2 oversized" in line)
    assert "6.00x" in oversized and oversized.endswith("| yes |")
    assert "| tests | TIMED OUT | 120 | 120 |" in text
    assert "suite kernelwarehouse did not run" in text
    assert "triton: FAIL" in text and "crashed (SIGABRT)" in text and "tests: exit 124" in text


def _timed(case, impl, ms, dtype="bfloat16", op="depthwise_conv2d", **fields):
    return _record(case, impl, dtype, op=op, ms=ms, torch=impl.startswith("torch_") or impl == "reference", **fields)


K7 = "convnext s1 k7 fwd b64 c96 56x56 k7x7"
K31 = "replknet s1 k31 fwd+bwd b64 c128 56x56 k31x31"
K13 = "replknet s3 k13 fwd b64 c512 14x14 k13x13"
DET = "det b1 k13 fwd b1 c128 200x304 k13x13"
PARC = "parcv2 7 full fwd b64 c512 7x7 k13x13"
K3 = "mobilenet k3 fwd+bwd b64 c144 56x56 k3x3"
PLANNER = "csrc/depthwise_conv2d/depthwise_conv2d_toeplitz.h: plan_toeplitz (kToeplitzWaste)"
STATIC_TRITON = {"impl": "triton", "rule": "Toeplitz rule -> Triton", "where": "toeplitz.py: plan"}


def _routing_rows():
    k7_rule = {"impl": "torch_nchw", "rule": "K <= CUDNN_MAX_KERNEL (7) -> cuDNN",
               "where": "ops/dw.py: CUDNN_MAX_KERNEL"}
    return [
        # auto slower: the K <= 7 rule sent it to cuDNN, the register tiles are faster (torch_compile was skipped)
        *[_timed(K7, impl, ms) for impl, ms in (("torch_nchw", 1.0), ("torch_channels_last", 0.95), ("cuda", 0.82),
                                               ("cuda_tiles", 0.8), ("triton", 2.0))],
        {**_record(K7, "torch_compile", "bfloat16"), "check": "skipped", "torch": True},
        _timed(K7, "auto", 1.0, pick=k7_rule),
        # auto best: it ran Triton, fastest of all
        *[_timed(K31, impl, ms) for impl, ms in (("torch_nchw", 9.0), ("torch_channels_last", 8.0), ("cuda", 3.0),
                                                ("cuda_tiles", 4.0), ("triton", 1.02))],
        _timed(K31, "auto", 1.0, pick={**STATIC_TRITON}),
        # the autotuner ran CUDA's Toeplitz GEMMs; the register tiles win (the C++ planner's rule), and the static
        # rule's Triton is slower still; a FAILing row faster than everything is no option
        *[_timed(K13, impl, ms) for impl, ms in (("torch_nchw", 5.0), ("cuda", 1.0), ("cuda_tiles", 0.5),
                                                ("triton", 2.0))],
        {**_timed(K13, "torch_channels_last", 0.1), "check": "FAIL"},
        _timed(K13, "auto", 1.0, pick={"impl": "cuda", "detail": "Toeplitz GEMMs", "rule": "autotune: measured",
                                       "where": "_autotune.py", "static": STATIC_TRITON,
                                       "retune": {"cuda_tiles": f"the C++ planner's Toeplitz rule ({PLANNER})"}}),
        # a record without a pick; no PyTorch row (cut short) and no cuda_tiles row
        _timed(DET, "cuda", 1.0), _timed(DET, "triton", 3.0), _timed(DET, "auto", 1.3),
        # auto's own choice, timed as its own row, is faster than auto: overhead, no rule to change
        _timed(PARC, "torch_nchw", 3.0), _timed(PARC, "triton", 0.5),
        _timed(PARC, "auto", 0.6, pick={**STATIC_TRITON}),
        # PyTorch's channels_last is the fastest option: the autotuner times cuDNN on the caller's layout only
        *[_timed(K3, impl, ms) for impl, ms in (("torch_nchw", 1.0), ("torch_channels_last", 0.5), ("cuda", 1.1))],
        _timed(K3, "auto", 1.0, pick={"impl": "torch_nchw", "rule": "autotune: measured", "where": "_autotune.py",
                                      "retune": {"torch_channels_last": "the autotuner's candidates (NCHW only)"}}),
    ]


def test_summary_routing_table_names_the_rule_to_retune(tmp_path):
    kw = [_timed("r50 s4 3x3 b64", impl, ms, op="kw_conv2d fwd+bwd", **extra)
          for impl, ms, extra in (("static cudnn", 0.1, {"check": "baseline"}), ("reference", 3.0, {}),
                                  ("triton", 1.2, {}), ("triton fused", 0.9, {}), ("cuda", 2.0, {}),
                                  ("auto", 1.0, {"pick": {"impl": "triton fused", "rule": "fused_wins -> fused",
                                                          "where": "kw_conv2d.py: FUSED_MAX_EXTRA"}}))]
    network = [_timed("KW-ResNet-50 inference b64", impl, ms, op="kw_resnet50")
               for impl, ms in (("reference", 2.0), ("auto", 1.0))]   # no per-path rows: not a routing row
    for suite, records in (("depthwise_conv2d", _routing_rows()), ("kernelwarehouse", kw + network)):
        (tmp_path / f"bench_{suite}.json").write_text(json.dumps({"environment": {}, "results": records}))
    text = summary.summarize(tmp_path)
    section = text[text.index("## Routing"):text.index("## Checks")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert "**6 of 7** cases" in section        # all but K31
    k7 = rows[K7]
    assert "torch_nchw · K <= CUDNN_MAX_KERNEL (7) -> cuDNN | 1.0000 |" in k7
    assert "cuda_tiles 0.8000 (0.80x)" in k7 and "torch_channels_last 0.9500 (0.95x)" in k7
    assert ("**auto 1.25x the fastest**: cuda_tiles 0.80x of auto → K <= CUDNN_MAX_KERNEL (7) -> cuDNN "
            "(ops/dw.py: CUDNN_MAX_KERNEL) would gain") in k7
    assert rows[K31].endswith("| auto fastest |") and "triton 1.0200 (1.02x)" in rows[K31]
    k13 = rows[K13]
    assert "cuda (Toeplitz GEMMs) · autotune: measured" in k13 and "torch_nchw 5.0000" in k13   # FAIL row left out
    assert (f"**auto 2.00x the fastest**: cuda_tiles 0.50x of auto → the C++ planner's Toeplitz rule ({PLANNER})"
            in k13)
    assert ("static rule picks triton, 4.00x the fastest (cuda_tiles) → Toeplitz rule -> Triton (toeplitz.py: plan) "
            "would gain") in k13
    det = rows[DET]
    assert "? (pick not recorded)" in det and "| cuda 1.0000 (0.77x) | - |" in det
    assert "cuda 0.77x of auto; rule unknown (no pick recorded)" in det
    assert "triton runs auto's choice in 0.83x of auto's time: overhead" in rows[PARC]
    assert ("**auto 2.00x the fastest**: torch_channels_last 0.50x of auto → the autotuner's candidates (NCHW only) "
            "would gain") in rows[K3] and "| cuda 1.1000 (1.10x) | torch_channels_last 0.5000 (0.50x) |" in rows[K3]
    layer = rows["kw_conv2d fwd+bwd: r50 s4 3x3 b64"]
    # the static cudnn row (0.1 ms) computes something else: no option
    assert "triton fused 0.9000 (0.90x)" in layer and "reference 3.0000 (3.00x)" in layer
    assert "**auto 1.11x the fastest**: triton fused runs auto's choice" in layer
    assert not any("KW-ResNet-50" in line for line in rows)
    assert "Not in this run" not in section


def test_summary_routing_survives_a_run_cut_short(tmp_path):
    assert "No bench results of depthwise_conv2d, kernelwarehouse" in summary.summarize(tmp_path)
    cpu = [_record(K7, "torch_nchw", torch=True), _record(K7, "cuda (CPU emulation)", torch=False)]  # no auto on CPU
    (tmp_path / "bench_depthwise_conv2d.json").write_text(json.dumps({"environment": {}, "results": cpu}))
    text = summary.summarize(tmp_path)
    assert "No case with an `auto` row next to our own paths" in text and "Not in this run: kernelwarehouse." in text
    untimed = _routing_rows()[:6] + [{**_record(K7, "auto", "bfloat16"), "check": "ERROR", "error": "CUDA error: boom",
                                      "torch": False}]
    (tmp_path / "bench_depthwise_conv2d.json").write_text(json.dumps({"environment": {}, "results": untimed}))
    row = next(line for line in summary.summarize(tmp_path).splitlines() if line.startswith(f"| {K7} "))
    assert "| - |" in row and "auto not timed (ERROR: CUDA error: boom)" in row and "? (pick not recorded)" in row
    odd = [_timed(DET, "cuda", None), _timed(DET, "triton", 2.0), _timed(DET, "auto", 1.0, pick="cuda"),
           _timed(K31, "triton", 0.5), _timed(K31, "auto", 1.0, pick={"impl": None, "rule": "autotune: measured"})]
    (tmp_path / "bench_depthwise_conv2d.json").write_text(json.dumps({"environment": {}, "results": odd}))
    lines = summary.summarize(tmp_path).splitlines()
    row = next(line for line in lines if line.startswith(f"| {DET} "))
    assert "? (pick not recorded)" in row and "triton 2.0000 (2.00x)" in row and row.endswith("| auto fastest |")
    row = next(line for line in lines if line.startswith(f"| {K31} "))   # the autotuner had not measured it
    assert "? (not yet measured) · autotune" in row and "auto's choice is not known (autotune: measured)" in row


def test_bench_rows_get_best_torch_and_roofline():
    case = harness.Case("op", "c", torch.float32, setup=None, flops=2e9, bytes=3e9, baseline="static")
    ceilings = {"copy_GBps": 3000.0, "tensor_TFLOPs": 800.0, "fp32_TFLOPs": 50.0}
    assert harness.bound_ms(case, ceilings) == pytest.approx(1.0)             # 3 GB at 3 TB/s > 2 GFLOP at 50
    half = harness.Case("op", "c", torch.bfloat16, setup=None, flops=1.6e12, bytes=1.0)
    assert harness.bound_ms(half, ceilings) == pytest.approx(2.0)             # 1.6 TFLOP at 800 TFLOP/s
    assert harness.bound_ms(case, None) is None
    results = {name: {"impl": name, "torch": case.is_torch(name), "ms": ms}
               for name, ms in (("torch_nchw", 4.0), ("torch_channels_last", 2.0), ("auto", 1.0), ("static", 0.5))}
    results["torch_compile"] = {"impl": "torch_compile", "torch": True}       # skipped: not timed
    harness._compare(case, results)
    assert results["auto"]["best_torch"] == "torch_channels_last"
    assert results["auto"]["x_best_torch"] == pytest.approx(2.0)
    assert results["torch_nchw"]["x_best_torch"] == pytest.approx(0.5)
    assert results["auto"]["x_baseline"] == pytest.approx(0.5)
    explicit = harness.Case("op", "c", torch.float32, None, 1.0, 1.0, torch_impls=("reference",))
    assert explicit.is_torch("reference") and not explicit.is_torch("torch_nchw")


def test_compile_budget_skips_once_spent():
    budget = harness.CompileBudget(0.0)
    calls = []
    fn = budget.wrap(lambda: (lambda: calls.append(1)))
    with pytest.raises(harness.Skipped, match="compile budget"):
        fn()
    assert not calls
    unlimited = harness.CompileBudget(None)
    fn = unlimited.wrap(lambda: (lambda: calls.append(1) or len(calls)))
    assert fn() == 1 and fn() == 2 and unlimited.spent >= 0
    records = harness.run_cases([harness.Case("op", "skip", torch.float32,
                                              lambda device, small: ({"torch_compile": budget.wrap(lambda: None)},
                                                                     lambda: torch.zeros(1)), 1.0, 1.0)], quick=True)
    assert records[0]["check"] == "skipped"


def test_sanitize_ops_runs_every_path_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "repkernels.bench.sanitize_ops", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 path(s) failed" in proc.stdout
    assert proc.stdout.count(" ok\n") >= 10


def test_test_deadline_skips_what_would_start_late(tmp_path):
    """The GPU check's test stage: tests that would start after REPKERNELS_TEST_DEADLINE are skipped (reported)."""
    xml = tmp_path / "pytest.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_build.py::test_ops_registered_iff_extension_loaded",
                           "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "REPKERNELS_TEST_DEADLINE": "0"})
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
    (tmp_path / "stages.tsv").write_text("tests\t0\t1\t1\n")
    assert "1 of the skipped not started: time budget spent" in summary.summarize(tmp_path)


def test_every_goal_selects_rows_of_its_suite_in_a_quick_run():
    """The GPU check runs the suites with --quick: each goal must find rows there (a renamed case or op would leave
    a goal 'not measured' on the GPU)."""
    from repkernels.bench import suites

    for goal in goals.GOALS:
        rows = [_record(case.name, impl, dtype, op=case.op)
                for dtype in goal.dtypes for case in suites.SUITES[goal.suite]([getattr(torch, dtype)], quick=True)
                for impl in goal.impls]
        assert any(goal.select(r) for r in rows), goal.text
