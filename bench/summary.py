"""``python bench/summary.py OUTDIR`` (or ``python -m repkernels.bench.summary OUTDIR``): the GPU check's ``summary.md`` from what its stages wrote.

Reads, where present: ``stages.tsv`` (stage, exit status, seconds, budget: written by bench/gpu_check.sh),
``env.txt``, ``bench_<suite>.json``, ``pytest.xml`` (JUnit), ``canary.json`` and ``sanitizer.txt``; writes
``summary.md``: the run's stages, one table of every speed goal (:mod:`repkernels.bench.goals`) with its
target, the measured value and whether it is met, the routing table (:mod:`repkernels.bench.routing`: what
``auto`` ran per case against the fastest option, and the rule to re-tune where it is slower), then every
failure found. Safe to run after any stage, so a run cut short still leaves a summary of what it finished.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

try:
    from .goals import GOALS
    from .routing import routing_section
except ImportError:  # run as a script (python bench/summary.py OUTDIR), before the package is built
    from goals import GOALS
    from routing import routing_section

SANITIZER_ERROR_MARKERS = ("========= Invalid", "========= Race", "========= Error", "========= Program hit",
                           "========= Uninitialized", "========= Barrier", "========= Malloc")


def _bench(outdir: Path) -> tuple[dict[str, list[dict]], dict]:
    suites, env = {}, {}
    for path in sorted(outdir.glob("bench_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        suites[path.stem[len("bench_"):]] = data.get("results", [])
        env = env or data.get("environment", {})
    return suites, env


def _stages(outdir: Path) -> list[list[str]]:
    path = outdir / "stages.tsv"
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _pytest(outdir: Path) -> tuple[str | None, list[str]]:
    path = outdir / "pytest.xml"
    if not path.exists():
        return None, []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return f"pytest.xml unreadable ({exc}): the test stage was probably cut short", []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                msg = (node.get("message") or node.text or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')} ({tag}): {msg[0][:200] if msg else ''}")
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    out_of_time = sum(1 for node in root.iter("skipped") if "time budget" in (node.get("message") or ""))
    line = (f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped "
            f"(of {count['tests']})" + (f"; {out_of_time} of the skipped not started: time budget spent"
                                        if out_of_time else ""))
    return line, failures


def _canary(outdir: Path) -> tuple[str | None, list[str]]:
    path = outdir / "canary.json"
    if not path.exists():
        return None, []
    results = json.loads(path.read_text()).get("results", [])
    bad = [f"{r['case']}: {r['status']} {r['detail'].splitlines()[0][:200] if r['detail'] else ''}".rstrip()
           for r in results if r["status"] != "ok"]
    return f"{len(results) - len(bad)} of {len(results)} bad-argument calls raised", bad


def _sanitizer(outdir: Path) -> tuple[str | None, list[str]]:
    path = outdir / "sanitizer.txt"
    if not path.exists():
        return None, []
    lines = path.read_text(errors="replace").splitlines()
    errors = [ln.strip() for ln in lines if ln.startswith(SANITIZER_ERROR_MARKERS)]
    summaries = [ln.strip() for ln in lines if "ERROR SUMMARY" in ln or ln.startswith(("sanitizer:", "sanitize_ops:"))]
    return "; ".join(summaries) or "no summary line (cut short?)", errors[:40]


def _bench_failures(suites: dict[str, list[dict]]) -> list[str]:
    out = []
    for suite, records in suites.items():
        for r in records:
            if r.get("check") in ("FAIL", "ERROR") or (r.get("check") == "unchecked" and r.get("error")):
                out.append(f"{suite}: {r['op']} | {r['case']} | {r['dtype']} | {r['impl']}: {r['check']} "
                           f"{(r.get('error') or '')[:200]}".rstrip())
    return out


def summarize(outdir: Path) -> str:
    suites, env = _bench(outdir)
    records = [r for rs in suites.values() for r in rs]
    timed = any("ms" in r for r in records)
    lines = ["# GPU check summary", ""]
    env_txt = outdir / "env.txt"
    head = env_txt.read_text(errors="replace").splitlines()[:8] if env_txt.exists() else []
    if env:
        lines.append(f"device: **{env.get('device')}**, commit {env.get('commit')}, torch {env.get('torch')}, "
                     f"CUDA {env.get('cuda')}, triton {env.get('triton')}, python {env.get('python')}, "
                     f"{env.get('date')}")
        ceil = env.get("ceilings")
        if ceil:
            lines.append(f"roofline ceilings: copy {ceil['copy_GBps']:.0f} GB/s and bf16 tensor cores "
                         f"{ceil['tensor_TFLOPs']:.0f} TFLOP/s (measured), fp32 FMA {ceil['fp32_TFLOPs']} TFLOP/s "
                         f"({ceil['sources']['fp32_TFLOPs']})")
    lines += [f"    {ln}" for ln in head]
    stages = _stages(outdir)
    if stages:
        lines += ["", "## Stages", "", "| stage | result | seconds | budget (s) |", "| --- | --- | --- | --- |"]
        for st in stages:
            name, rc, secs, budget = (st + ["", "", "", ""])[:4]
            result = {"0": "ok", "124": "TIMED OUT", "skip": "skipped"}.get(rc, f"exit {rc}")
            lines.append(f"| {name} | {result} | {secs} | {budget} |")

    lines += ["", "## Speed goals", ""]
    if not timed:
        lines.append("No bench row was timed (no GPU, or the bench stage did not run): every goal is unmeasured.")
        lines.append("")
    lines += ["| source | goal | target | measured (worst row per dtype) | met |", "| --- | --- | --- | --- | --- |"]
    for goal in GOALS:
        if goal.suite not in suites:
            res = {"measured": f"not measured (suite {goal.suite} did not run)", "met": None}
        else:
            res = goal.evaluate(suites[goal.suite])
            if res["met"] is None and not any(goal.select(r) for r in suites[goal.suite]):
                res["measured"] = "not measured (no bench row for it yet)"
            elif res["met"] is None:
                res["measured"] = "not measured (no timed row" + (")" if timed else ": no GPU)")
        met = {True: "yes", False: "**no**", None: "-"}[res["met"]]
        lines.append(f"| {goal.source} | {goal.text} | {goal.target_text()} | {res['measured']} | {met} |")

    lines += routing_section(suites)

    failures: list[tuple[str, list[str]]] = []
    test_line, test_failures = _pytest(outdir)
    canary_line, canary_bad = _canary(outdir)
    san_line, san_errors = _sanitizer(outdir)
    lines += ["", "## Checks", ""]
    for label, line in (("GPU tests", test_line), ("error-path canary", canary_line), ("compute-sanitizer", san_line)):
        lines.append(f"- {label}: {line if line is not None else 'not run'}")
    failures += [("Stages that failed or timed out", [f"{s[0]}: exit {s[1]}" for s in stages
                                                       if len(s) > 1 and s[1] not in ("0", "skip")])]
    failures += [("Bench rows that failed, raised or could not be checked", _bench_failures(suites))]
    failures += [("Tests", test_failures), ("Canary", canary_bad), ("Sanitizer", san_errors)]
    lines += ["", "## Failures", ""]
    any_failure = False
    for title, items in failures:
        if items:
            any_failure = True
            lines.append(f"**{title}** ({len(items)})")
            lines += [f"- {item}" for item in items]
            lines.append("")
    if not any_failure:
        lines.append("None.")
    files = sorted(p.name for p in outdir.iterdir()
                   if p.is_file() and p.name not in ("summary.md", "summary.err", "stages.tsv.new"))
    lines += ["", "## Files", "", ", ".join(files), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m repkernels.bench.summary OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(argv[0])
    text = summarize(outdir)
    (outdir / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
