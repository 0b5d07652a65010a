"""Benchmark harness: correctness check, timing, roofline, table, JSON and PNG for every suite.

A suite (``repkernels.bench.suites.<op>``) yields :class:`Case` objects. For each case the harness
builds the inputs, runs every implementation once and checks it against the float64 reference, then
(on a GPU) times each one with warm-up and repeats (``triton.testing.do_bench``: median and the 20th/80th
percentiles; CUDA events without Triton; rows under 50 µs also by CUDA-graph replay) and reports:

* ``x_best_torch``: the fastest PyTorch option of the same computation (``best_torch_ms``: the case's
  ``torch_*`` implementations, e.g. ``F.conv2d`` on NCHW, on channels_last (cuDNN) and ``torch.compile``)
  over this row's time;
* ``bound_ms``: the roofline, the lower bound on time from the fewest bytes the problem must move (at the
  device's copy bandwidth, measured at the start of the run) and from its useful FLOPs (at the FP32 FMA
  peak for float32, the tensor-core peak for half precision); ``pct_roofline = 100 * bound_ms / ms``;
* ``x_baseline``: against the case's named comparison row (e.g. the static conv a dynamic one replaces).

Once per case family it records which kernels each PyTorch option ran (profiler kernel names).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Datasheet peaks (dense, SXM parts). fp32 is the CUDA-core FMA rate (what a non-tensor-core kernel can reach);
# bf16/fp16 the tensor-core rate. The roofline uses the copy bandwidth and tensor-core rate measured at the
# start of the run where it can (see measure_ceilings), these otherwise.
DEVICE_PEAKS = {
    "H200": {"bandwidth_GBps": 4800, "fp32_TFLOPs": 67, "bf16_TFLOPs": 989},
    "H100": {"bandwidth_GBps": 3350, "fp32_TFLOPs": 67, "bf16_TFLOPs": 989},
    "A100": {"bandwidth_GBps": 2039, "fp32_TFLOPs": 19.5, "bf16_TFLOPs": 312},
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to max |ref|
GRAPH_REPLAY_BELOW_MS = 0.05  # rows faster than this are also timed by CUDA-graph replay (launch gaps removed)


class Skipped(Exception):
    """Raised by an implementation that chose not to run (e.g. a compile budget is spent): reported, not a
    failure."""


@dataclasses.dataclass
class Case:
    """One benchmarked problem.

    ``setup(device, small)`` returns ``(impls, reference)``, ``(impls, reference, ran)`` or ``(impls, reference,
    ran, picks)``: ``impls`` maps implementation names ('torch_nchw', 'auto', 'cuda', 'triton', ...) to
    zero-argument callables over prebuilt inputs; ``reference`` is a zero-argument callable computing the float64
    result; ``ran`` (optional) describes the shape actually built (recorded as ``ran``; the name keeps the full
    shape for goals matching); ``picks`` (optional) maps implementation names (a router: 'auto') to zero-argument
    callables returning a JSON-able dict of what that implementation chose to run, asked once after its first
    call, outside any timing (recorded as ``pick``; ``pick_error`` when it raises).
    ``small=True`` asks for a shrunken problem that CPU backends (emulation, Triton interpreter) can check in
    seconds.

    ``torch_impls`` names the implementations that are PyTorch options of the *same* computation (default:
    every name starting with ``torch_``); the fastest is ``best_torch``. ``baseline`` names a comparison row
    (``x_baseline``), e.g. the static conv a dynamic conv replaces, listed in ``unchecked`` when it computes
    something else (check "baseline"). ``not_compared`` maps the other rows that are timed but not compared
    with the reference to the reason (check "n/a", field ``reason``), e.g. another semantics or a half-precision
    whole-network step. ``family`` groups cases whose PyTorch kernels are reported once (and the plot's panels).
    """

    op: str
    name: str
    dtype: torch.dtype
    setup: Callable[[str, bool], tuple[dict[str, Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]]
    flops: float  # useful floating-point operations (2 x MACs, no padding)
    bytes: float  # fewest bytes a kernel must move (inputs read once, outputs written once)
    baseline: str | None = None
    # Implementations timed for comparison but computing something else (e.g. the static conv a dynamic one
    # replaces): run once, not compared with the reference; recorded with check "baseline" for the row named by
    # ``baseline``, "n/a" (reason "computes something else") for any other.
    unchecked: tuple[str, ...] = ()
    # Implementations timed but not compared with the reference, with the reason: check "n/a", field "reason".
    not_compared: dict[str, str] = dataclasses.field(default_factory=dict)
    torch_impls: tuple[str, ...] | None = None
    family: str | None = None

    def is_torch(self, impl: str) -> bool:
        return impl in self.torch_impls if self.torch_impls is not None else impl.startswith("torch_")

    def not_compared_reason(self, impl: str) -> str | None:
        """Why ``impl`` is run but not compared with the reference (None: it is compared, or is the baseline)."""
        if impl in self.not_compared:
            return self.not_compared[impl]
        if impl in self.unchecked and impl != self.baseline:
            return "computes something else"
        return None


def half_step_reason(dtype: torch.dtype) -> str:
    """The reason a half-precision training step of a whole network is timed but not compared (check "n/a")."""
    short = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))
    return f"a {short} training step of a whole network is too ill-conditioned to compare with float64"


# check values of rows that were run and are timed on a GPU; none of them is a failure by itself
# ("unchecked" with an error is: the float64 reference could not be computed)
TIMED_CHECKS = ("ok", "baseline", "n/a", "unchecked")
# check values that are not failures
PASSING_CHECKS = ("ok", "baseline", "n/a", "skipped")


def device_peaks() -> tuple[str, dict[str, float] | None]:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return name, peaks
    return name, None


_CEILINGS: dict | None = None


def measure_ceilings() -> dict | None:
    """The roofline's ceilings for this device (None without a GPU), measured once per process.

    ``copy_GBps``: a 1 GiB device-to-device copy, bytes read + written (2 GiB) over the median time.
    ``tensor_TFLOPs``: an 8192³ bf16 matmul on random data (cuBLAS). ``fp32_TFLOPs``: the datasheet FP32 FMA rate
    (no library reaches it on a plain FMA stream; 2 x SMs x 128 FMA/clock x the boost clock otherwise)."""
    global _CEILINGS
    if _CEILINGS is not None or not torch.cuda.is_available():
        return _CEILINGS
    _, peaks = device_peaks()
    props = torch.cuda.get_device_properties(0)
    copy_gbps, tensor_tflops = _copy_GBps(), _matmul_TFLOPs()
    torch.cuda.empty_cache()
    clock_ghz = getattr(props, "clock_rate", 0) / 1e6  # kHz -> GHz (absent on some torch versions)
    fp32 = peaks["fp32_TFLOPs"] if peaks else 2 * props.multi_processor_count * 128 * clock_ghz / 1e3
    _CEILINGS = {"copy_GBps": round(copy_gbps, 1), "tensor_TFLOPs": round(tensor_tflops, 1),
                 "fp32_TFLOPs": fp32,
                 "sources": {"copy_GBps": "measured (1 GiB device copy)",
                             "tensor_TFLOPs": "measured (8192^3 bf16 matmul)",
                             "fp32_TFLOPs": "datasheet" if peaks else "2 x SMs x 128 x clock"}}
    return _CEILINGS


def _copy_GBps() -> float:
    src = torch.empty(2**30 // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_stats(lambda: dst.copy_(src), quick=True)["ms"] / 1e6


def _matmul_TFLOPs(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / time_stats(lambda: a @ b, quick=True)["ms"] / 1e9


def bound_ms(case: Case, ceilings: dict | None) -> float | None:
    """Roofline lower bound on the case's time: max(bytes / bandwidth, flops / peak), in ms."""
    if not ceilings:
        return None
    peak = ceilings["fp32_TFLOPs"] if case.dtype in (torch.float32, torch.float64) else ceilings["tensor_TFLOPs"]
    return max(case.bytes / (ceilings["copy_GBps"] * 1e6), case.flops / (peak * 1e9))


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(passed, error relative to max |ref|)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape or not torch.isfinite(out64).all():
        return False, float("inf")
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = (out64 - ref64).abs().max().item() / scale if out64.numel() else 0.0
    return err <= CHECK_TOL.get(dtype, 1e-8), err


def time_stats(fn: Callable[[], object], quick: bool) -> dict[str, float]:
    """Median and 20th/80th percentile time of ``fn`` in milliseconds (GPU)."""
    try:
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                 quantiles=[0.2, 0.5, 0.8])
        return {"ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80)}
    except ImportError:
        for _ in range(3 if quick else 10):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10 if quick else 50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return {key: times[min(int(q * len(times)), len(times) - 1)]
                for key, q in (("ms", 0.5), ("p20_ms", 0.2), ("p80_ms", 0.8))}


def graph_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median time per call of ``fn`` replayed from a CUDA graph holding ``calls`` calls (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm on the side stream (allocator pools, lazy initialisation)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def kernel_names(fn: Callable[[], object]) -> list[str]:
    """Names of the GPU kernels one call of ``fn`` runs, in order of first launch (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names: list[str] = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.name not in names:
            names.append(ev.name)
    return names


def _progress(items: list, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        def gen():
            for i, item in enumerate(items):
                print(f"\r{desc}: {i + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
                yield item
            print(file=sys.stderr)
        return gen()


def run_cases(cases: list[Case], quick: bool, log: Callable[[str], None] | None = None) -> list[dict]:
    """Check (and on a GPU, time) every implementation of every case. Returns one record per pair.

    float32 means IEEE float32 for every implementation, cuDNN included: TF32 is switched off for the run
    (``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``), so no path is timed
    with cheaper, less precise products than another, and the float32 check tolerance applies to all.
    ``log`` receives one line per case family with the kernels each PyTorch option ran (GPU only)."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _run_cases(cases, quick, log or (lambda line: None))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32


def _free_memory() -> None:
    """Drop what a failed or finished case left behind (an out-of-memory error keeps its frames' tensors alive
    until collected), so that one case cannot make the following ones fail."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time_record(rec: dict, fn: Callable[[], object], case: Case, quick: bool, ceilings: dict | None) -> None:
    try:
        rec.update(time_stats(fn, quick))
    except Exception as exc:  # noqa: BLE001
        rec.update(check="ERROR", error=f"timing: {type(exc).__name__}: {exc}")
        _free_memory()
        return
    if rec["ms"] < GRAPH_REPLAY_BELOW_MS:
        try:
            rec["graph_ms"] = graph_ms(fn)
        except Exception as exc:  # noqa: BLE001 - a path that cannot be captured is still timed eagerly
            rec["graph_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            torch.cuda.synchronize()
    ms = rec["ms"]
    rec.update(TFLOPs=case.flops / ms / 1e9, GBps=case.bytes / ms / 1e6)
    bound = bound_ms(case, ceilings)
    if bound is not None:
        rec.update(bound_ms=bound, pct_roofline=100.0 * bound / ms)


def _run_cases(cases: list[Case], quick: bool, log: Callable[[str], None]) -> list[dict]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    ceilings = measure_ceilings() if gpu else None
    families_seen: set[tuple[str, str]] = set()
    records = []
    for case in _progress(cases, "benchmarking" if gpu else "checking"):
        base = {"op": case.op, "case": case.name, "dtype": str(case.dtype).replace("torch.", ""),
                "family": case.family or case.op}
        try:
            built = case.setup(device, not gpu)
            impls, reference = built[0], built[1]
            if len(built) > 2 and built[2]:
                base["ran"] = str(built[2])
            picks = built[3] if len(built) > 3 and built[3] else {}
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            records.append({**base, "impl": "(setup)", "check": "ERROR", "error": f"{type(exc).__name__}: {exc}"})
            _free_memory()
            continue
        try:
            ref, ref_error = reference(), None
        except Exception as exc:  # noqa: BLE001 - e.g. the float64 model of a large batch does not fit
            ref, ref_error = None, f"float64 reference failed, {type(exc).__name__}: {str(exc)[:200]}"
            _free_memory()
        results = {}
        for name, fn in impls.items():
            rec = {**base, "impl": name, "torch": case.is_torch(name)}
            try:
                reason = case.not_compared_reason(name)
                if reason is not None:
                    fn()
                    rec.update(check="n/a", reason=reason)
                elif name in case.unchecked:
                    fn()
                    rec.update(check="baseline")
                elif ref is None:
                    fn()
                    rec.update(check="unchecked", error=ref_error)
                else:
                    ok, err = check(fn(), ref, case.dtype)
                    rec.update(check="ok" if ok else "FAIL", rel_error=err)
            except Skipped as exc:
                rec.update(check="skipped", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - reported, never hidden
                rec.update(check="ERROR", error=f"{type(exc).__name__}: {exc}")
                _free_memory()
            if name in picks and rec["check"] not in ("ERROR", "skipped"):
                _pick_record(rec, picks[name])
            if gpu and rec["check"] in TIMED_CHECKS:
                _time_record(rec, fn, case, quick, ceilings)
            results[name] = rec
            records.append(rec)
        family = (case.family or case.op, base["dtype"])
        if gpu and family not in families_seen:
            families_seen.add(family)
            for name, fn in impls.items():
                if case.is_torch(name) and results[name]["check"] in TIMED_CHECKS:
                    try:
                        results[name]["kernels"] = kernel_names(fn)
                    except Exception as exc:  # noqa: BLE001
                        results[name]["kernels"] = [f"(profiler failed: {type(exc).__name__}: {exc})"]
                    log(f"kernels [{family[0]}, {family[1]}] {name}: {', '.join(results[name]['kernels'])}")
        _compare(case, results)
        del impls, reference, ref, results, built
        _free_memory()
    return records


def _pick_record(rec: dict, pick: Callable[[], dict]) -> None:
    """Record what a router chose (``pick``), after its first call has made the choice."""
    try:
        rec["pick"] = pick()
    except Exception as exc:  # noqa: BLE001 - the row is still timed, without its pick
        rec["pick_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"


def _compare(case: Case, results: dict[str, dict]) -> None:
    """Fill best_torch_ms / x_best_torch and x_baseline on the timed records of one case."""
    timed_torch = [r for r in results.values() if r["torch"] and "ms" in r]
    best = min(timed_torch, key=lambda r: r["ms"]) if timed_torch else None
    base = results.get(case.baseline) if case.baseline else None
    for rec in results.values():
        if "ms" not in rec:
            continue
        if best is not None:
            rec.update(best_torch=best["impl"], best_torch_ms=best["ms"], x_best_torch=best["ms"] / rec["ms"])
        if base is not None and "ms" in base:
            rec.update(baseline=case.baseline, x_baseline=base["ms"] / rec["ms"])


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def check_label(rec: dict) -> str:
    """The check column: the check value, with the reason for a row that is not compared ("n/a (...)")."""
    return f"{rec['check']} ({rec['reason']})" if rec.get("reason") else rec["check"]


def format_table(records: list[dict]) -> str:
    """The results as a text table (timed columns when any record was timed). The text columns are as wide as
    their longest value, so every row's check column starts at the same offset. Without timings the ``ran``
    column gives the (shrunken) shape each case actually ran."""
    gpu = any("ms" in r for r in records)
    show_ran = not gpu and any(r.get("ran") for r in records)
    text_cols = [("op", "op"), ("case", "case")] + ([("ran", "ran (CPU shape)")] if show_ran else []) + \
        [("dtype", "dtype"), ("impl", "impl")]
    widths = {key: max([len(title)] + [len(str(r.get(key) or "-")) for r in records]) for key, title in text_cols}

    def text_prefix(values: dict) -> str:
        return " ".join(f"{values.get(key) or '-'!s:<{widths[key]}}" for key, _ in text_cols)

    titles = text_prefix({key: title for key, title in text_cols})
    if gpu:
        head = (f"{titles} {'ms':>9} {'p20-p80':>15} {'graph':>8} "
                f"{'x best':>6} {'bound':>8} {'%roof':>6} {'x base':>6} check")
    else:
        head = f"{titles} {'rel.err':>9} check"
    lines = [head, "-" * len(head)]
    for r in records:
        prefix = text_prefix(r)
        note = f" {r['error']}" if r.get("error") else ""
        if gpu:
            spread = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if "p20_ms" in r else "-"
            lines.append(f"{prefix} {_fmt(r.get('ms'), '.4f', 9)} {spread:>15} {_fmt(r.get('graph_ms'), '.4f', 8)} "
                         f"{_fmt(r.get('x_best_torch'), '.2f', 6)} {_fmt(r.get('bound_ms'), '.4f', 8)} "
                         f"{_fmt(r.get('pct_roofline'), '.1f', 6)} {_fmt(r.get('x_baseline'), '.2f', 6)} "
                         f"{check_label(r)}{note}".rstrip())
        else:
            lines.append(f"{prefix} {_fmt(r.get('rel_error'), '.1e', 9)} {check_label(r)}{note}".rstrip())
    if gpu:
        lines.append("x best = the fastest PyTorch option of the same case (torch_* rows) / this row; bound = roofline "
                     "lower bound (ms); %roof = 100 * bound / ms; x base = the case's comparison row / this row")
    lines.append("check: ok = agrees with the float64 reference within the dtype's tolerance; baseline = the "
                 "comparison row (computes something else); n/a = run but not compared (reason given)")
    return "\n".join(lines)


def git_commit() -> str | None:
    """Short sha of the checkout the bench runs from ('-dirty' with uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        import os

        return os.environ.get("REPKERNELS_COMMIT")
    return sha + ("-dirty" if dirty else "")


def environment() -> dict:
    import os

    import repkernels
    from repkernels import _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name, peaks = device_peaks()
    return {"device": name, "peaks": peaks, "ceilings": measure_ceilings(), "repkernels": repkernels.__version__,
            "commit": os.environ.get("REPKERNELS_COMMIT") or git_commit(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "extension": _extension.build_info(),
            "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds")}


def write_json(path: Path, env: dict, records: list[dict]) -> None:
    path.write_text(json.dumps({"environment": env, "results": records}, indent=2))


def _wrap(text: str, width: int = 46) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def _plot_label(rec: dict, timed: bool) -> str:
    if not timed and rec.get("ran"):  # the shape actually run (shrunken on CPU) under the case's name
        return _wrap(rec["case"]) + "\n" + _wrap(f"[{rec['dtype']}] ran {rec['ran']}")
    return _wrap(f"{rec['case']} [{rec['dtype']}]")


def write_plot(path: Path, records: list[dict], device: str) -> bool:
    """The results as a PNG, one panel per case family (``family``, else ``op``).

    With timings (GPU): the speed-up over the best PyTorch option per case and implementation. Without (CPU): each
    implementation's error relative to the float64 reference (log scale) next to the dtype's tolerance
    (:data:`CHECK_TOL`); rows not compared are left out, failures are drawn red at the right edge. False when
    matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = any("ms" in r for r in records)
    if timed:
        rows = [r for r in records if "x_best_torch" in r and not r.get("torch")]
        def value(r): return r["x_best_torch"]
    else:
        rows = [r for r in records if isinstance(r.get("rel_error"), (int, float))]
        def value(r): return r["rel_error"]
    if not rows:
        return False
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(f"{r['op']}" if r.get("family", r["op"]) == r["op"] else f"{r['op']}: {r['family']}",
                            []).append(r)
    panels = []
    for family, recs in families.items():
        labels = list(dict.fromkeys(_plot_label(r, timed) for r in recs))
        impls = list(dict.fromkeys(r["impl"] for r in recs))
        panels.append((family, recs, labels, impls))
    heights = [max(1.2, 0.22 * len(labels) * len(impls) + 0.35 * sum(lbl.count("\n") for lbl in labels) + 0.9)
               for _, _, labels, impls in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    cmap = plt.get_cmap("tab10")
    all_impls = list(dict.fromkeys(r["impl"] for r in rows))
    color = {impl: cmap(i % 10) for i, impl in enumerate(all_impls)}
    finite = [value(r) for r in rows if math.isfinite(value(r))]
    positive = [v for v in finite if v > 0]
    floor = min([1e-9] + [v / 10 for v in positive])  # where an error of exactly 0 is drawn
    top = max(finite + [max(CHECK_TOL.values())])
    for ax, (family, recs, labels, impls) in zip(axes[:, 0], panels):
        height = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = {_plot_label(r, timed): value(r) for r in recs if r["impl"] == impl}
            ys, xs, bad = [], [], []
            for i, lbl in enumerate(labels):
                if lbl not in vals:
                    continue
                v = vals[lbl]
                y = i + j * height
                if not timed and not math.isfinite(v):
                    bad.append(y)
                    continue
                ys.append(y)
                xs.append(max(v, floor) if not timed else v)
            if timed:
                ax.barh(ys, xs, height=height, label=impl, color=color[impl])
            else:
                ax.scatter(xs, ys, label=impl, color=color[impl], s=18, zorder=3)
                ax.hlines(ys, floor, xs, color=color[impl], linewidth=1.0)
                if bad:
                    ax.scatter([top * 10] * len(bad), bad, color="red", marker="x", s=30, zorder=4)
        if timed:
            ax.axvline(1.0, color="k", linewidth=0.8)
        else:
            ax.set_xscale("log")
            ax.set_xlim(floor / 2, top * 30)
            dtypes = sorted({r["dtype"] for r in recs})
            for k, dt in enumerate(dtypes):
                tol = CHECK_TOL.get(getattr(torch, dt, None), 1e-8)
                ax.axvline(tol, color="k", linestyle=("--", ":", "-.")[k % 3], linewidth=1.0,
                           label=f"{dt} tolerance {tol:g}")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.5, len(labels) - 0.1)
        ax.invert_yaxis()
        ax.set_title(family, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    xlabel = ("speed-up over the best PyTorch option (NCHW, channels_last, torch.compile), higher is better"
              if timed else "max |out - ref64| / max |ref64| (log scale; shrunken CPU shapes), lower is better; "
              "red x: failed")
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(f"repkernels on {device}: " + ("speed-up" if timed else "error against the float64 reference "
                                                 "(no timings without a GPU)"), fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


class CompileBudget:
    """A process-wide allowance of seconds for ``torch.compile`` baselines (their first call compiles).

    ``wrap(fn)`` returns a callable that compiles ``fn`` on first use while the allowance lasts and raises
    :class:`Skipped` once it is spent, so a slow compiler cannot eat a GPU slot's time. ``None`` seconds: no
    limit. Set with ``--compile-budget`` or ``REPKERNELS_BENCH_COMPILE_BUDGET_S``."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.spent = seconds, 0.0

    def wrap(self, make: Callable[[], Callable[[], object]]) -> Callable[[], object]:
        state: dict = {}

        def call():
            if "fn" not in state:
                if self.seconds is not None and self.spent >= self.seconds:
                    raise Skipped(f"compile budget of {self.seconds:.0f} s spent")
                start = time.monotonic()
                try:
                    fn = make()
                    out = fn()
                finally:
                    self.spent += time.monotonic() - start
                state["fn"] = fn
                return out
            return state["fn"]()
        return call


def _budget_from_env() -> float | None:
    import os

    value = os.environ.get("REPKERNELS_BENCH_COMPILE_BUDGET_S", "").strip()
    return float(value) if value else None


COMPILE_BUDGET = CompileBudget(_budget_from_env())
