"""Benchmark harness: correctness check, timing, table, JSON and PNG for every suite.

A suite (``repkernels.bench.suites.<op>``) yields :class:`Case` objects. For each case the harness
builds the inputs, runs every implementation once and checks it against the float64 reference, then
(on a GPU) times each one with warm-up and repeats (``triton.testing.do_bench``, median; CUDA
events without Triton) and reports time, speed-up over cuDNN and over the reference, and achieved
TFLOP/s and GB/s next to the device's peaks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# Datasheet peaks (dense, SXM parts), used to show the distance to the limit. fp32 is the CUDA-core
# rate (what a non-tensor-core kernel can reach); bf16/fp16 the tensor-core rate.
DEVICE_PEAKS = {
    "H200": {"bandwidth_GBps": 4800, "fp32_TFLOPs": 67, "bf16_TFLOPs": 989},
    "H100": {"bandwidth_GBps": 3350, "fp32_TFLOPs": 67, "bf16_TFLOPs": 989},
    "A100": {"bandwidth_GBps": 2039, "fp32_TFLOPs": 19.5, "bf16_TFLOPs": 312},
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to max |ref|


@dataclasses.dataclass
class Case:
    """One benchmarked problem.

    ``setup(device, small)`` returns ``(impls, reference)``: ``impls`` maps implementation names
    ('cudnn', 'reference', 'cuda', 'triton', ...) to zero-argument callables over prebuilt inputs;
    ``reference`` is a zero-argument callable computing the float64 result. ``small=True`` asks for a
    shrunken problem that CPU backends (emulation, Triton interpreter) can check in seconds.
    """

    op: str
    name: str
    dtype: torch.dtype
    setup: Callable[[str, bool], tuple[dict[str, Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]]
    flops: float  # useful floating-point operations (2 x MACs, no padding)
    bytes: float  # fewest bytes a kernel must move (inputs read once, outputs written once)
    baseline: str = "cudnn"
    # Implementations timed for comparison but computing something else (e.g. the static conv a dynamic one
    # replaces): run once, recorded with check "baseline", not compared with the reference.
    unchecked: tuple[str, ...] = ()


def device_peaks() -> tuple[str, dict[str, float] | None]:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return name, peaks
    return name, None


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(passed, error relative to max |ref|)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape or not torch.isfinite(out64).all():
        return False, float("inf")
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = (out64 - ref64).abs().max().item() / scale if out64.numel() else 0.0
    return err <= CHECK_TOL.get(dtype, 1e-8), err


def time_ms(fn: Callable[[], object], quick: bool) -> float:
    """Median time of ``fn`` in milliseconds (GPU)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
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
        return times[len(times) // 2]


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


def run_cases(cases: list[Case], quick: bool) -> list[dict]:
    """Check (and on a GPU, time) every implementation of every case. Returns one record per pair.

    float32 means IEEE float32 for every implementation, cuDNN included: TF32 is switched off for the run
    (``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``), so no path is timed
    with cheaper, less precise products than another, and the float32 check tolerance applies to all."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _run_cases(cases, quick)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32


def _free_memory() -> None:
    """Drop what a failed or finished case left behind (an out-of-memory error keeps its frames' tensors alive
    until collected), so that one case cannot make the following ones fail."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_cases(cases: list[Case], quick: bool) -> list[dict]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    records = []
    for case in _progress(cases, "benchmarking" if gpu else "checking"):
        base = {"op": case.op, "case": case.name, "dtype": str(case.dtype).replace("torch.", "")}
        try:
            impls, reference = case.setup(device, not gpu)
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
            rec = {**base, "impl": name}
            try:
                if name in case.unchecked:
                    fn()
                    rec.update(check="baseline")
                elif ref is None:
                    fn()
                    rec.update(check="unchecked", error=ref_error)
                else:
                    ok, err = check(fn(), ref, case.dtype)
                    rec.update(check="ok" if ok else "FAIL", rel_error=err)
            except Exception as exc:  # noqa: BLE001 - reported, never hidden
                rec.update(check="ERROR", error=f"{type(exc).__name__}: {exc}")
                _free_memory()
            if gpu and rec["check"] in ("ok", "baseline", "unchecked"):
                try:
                    ms = time_ms(fn, quick)
                    rec.update(ms=ms, TFLOPs=case.flops / ms / 1e9, GBps=case.bytes / ms / 1e6)
                except Exception as exc:  # noqa: BLE001
                    rec.update(check="ERROR", error=f"timing: {type(exc).__name__}: {exc}")
                    _free_memory()
            results[name] = rec
            records.append(rec)
        for rec in results.values():
            for base_name in (case.baseline, "reference"):
                if "ms" in rec and "ms" in results.get(base_name, {}):
                    rec[f"speedup_vs_{base_name}"] = results[base_name]["ms"] / rec["ms"]
        del impls, reference, ref, results
        _free_memory()
    return records


def format_table(records: list[dict], peaks: dict[str, float] | None) -> str:
    gpu = any("ms" in r for r in records)
    if gpu:
        head = f"{'op':<18} {'case':<34} {'dtype':<9} {'impl':<10} {'ms':>9} {'x cudnn':>8} {'x ref':>7} " \
               f"{'TFLOP/s':>8} {'GB/s':>8} {'%BW':>5} check"
    else:
        head = f"{'op':<18} {'case':<34} {'dtype':<9} {'impl':<22} {'rel.err':>9} check"
    lines = [head, "-" * len(head)]
    for r in records:
        if gpu:
            if "ms" in r:
                bw = f"{100 * r['GBps'] / peaks['bandwidth_GBps']:5.1f}" if peaks else "    -"
                sc = r.get("speedup_vs_cudnn")
                sr = r.get("speedup_vs_reference")
                lines.append(f"{r['op']:<18} {r['case']:<34} {r['dtype']:<9} {r['impl']:<10} {r['ms']:9.4f} "
                             f"{(f'{sc:.2f}' if sc else '-'):>8} {(f'{sr:.2f}' if sr else '-'):>7} "
                             f"{r['TFLOPs']:8.2f} {r['GBps']:8.0f} {bw} {r['check']} {r.get('error', '')}".rstrip())
            else:
                lines.append(f"{r['op']:<18} {r['case']:<34} {r['dtype']:<9} {r['impl']:<10} {'-':>9} "
                             f"{'':>8} {'':>7} {'':>8} {'':>8} {'':>5} {r['check']} {r.get('error', '')}")
        else:
            err = f"{r['rel_error']:9.1e}" if "rel_error" in r else f"{'-':>9}"
            lines.append(f"{r['op']:<18} {r['case']:<34} {r['dtype']:<9} {r['impl']:<22} {err} {r['check']} "
                         f"{r.get('error', '')}")
    return "\n".join(lines)


def environment() -> dict:
    import repkernels
    from repkernels import _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name, peaks = device_peaks()
    return {"device": name, "peaks": peaks, "repkernels": repkernels.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "extension": _extension.build_info(),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def write_json(path: Path, env: dict, records: list[dict]) -> None:
    path.write_text(json.dumps({"environment": env, "results": records}, indent=2))


def write_plot(path: Path, records: list[dict], device: str) -> bool:
    """Speed-up over cuDNN per case and implementation (PNG). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in records if "speedup_vs_cudnn" in r and r["impl"] != "cudnn"]
    if not timed:
        return False
    labels = sorted({f"{r['op']} {r['case']} {r['dtype']}" for r in timed}, key=str)
    impls = sorted({r["impl"] for r in timed})
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) * len(impls) + 1.5))
    height = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        vals = {f"{r['op']} {r['case']} {r['dtype']}": r["speedup_vs_cudnn"] for r in timed if r["impl"] == impl}
        ys = [i + j * height for i in range(len(labels))]
        ax.barh(ys, [vals.get(lbl, 0.0) for lbl in labels], height=height, label=impl)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed-up over cuDNN (F.conv2d), higher is better")
    ax.set_title(f"repkernels on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
