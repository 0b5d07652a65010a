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
