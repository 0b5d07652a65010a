"""Error-path canary: every C++ and Triton op called with bad arguments must raise a Python exception.

``python -m repkernels.bench.canary [--device cuda|cpu] [--json PATH]`` runs each case in a child process
(``python -X faulthandler``), so that a crash while an error is raised or formatted (a signal, e.g. the
``free(): invalid pointer`` abort once seen on a GPU image) is caught with its signal and the faulthandler
trace, and the remaining cases still run in a fresh child. A case passes when the call raises an
``Exception``; it fails when the call returns (a bad argument accepted silently), when the process dies, or
when the CUDA context is broken afterwards (a kernel launched on the bad arguments). Exit status 1 when any
case fails. Without a GPU (``--device cpu``) the C++ ops run their CPU emulation and Triton its interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

CHILD_TIMEOUT_S = 300


def _cases(device: str) -> list[tuple[str, Callable[[], object]]]:
    """(name, call) for every op and bad argument: each call must raise."""
    import torch

    from repkernels import _backend, _extension

    r = torch.ops.repkernels
    f32 = {"device": device, "dtype": torch.float32}
    one, zero = [1, 1], [0, 0]
    # depthwise: x (2, 2, 8, 8), w (2, 1, 3, 3); grad of the 'valid' output (2, 2, 6, 6)
    x, w, g = torch.randn(2, 2, 8, 8, **f32), torch.randn(2, 1, 3, 3, **f32), torch.randn(2, 2, 6, 6, **f32)
    # kw_assemble: 2 samples, layout (8, 6, 3, 3) from cells (4, 3, 1, 1): m = 2 * 2 * 9 = 36 mixtures of n = 5
    att, wh, layout = torch.randn(2, 36, 5, **f32), torch.randn(5, 4, 3, 1, 1, **f32), [8, 6, 3, 3]
    kgrad = torch.randn(2, 8, 6, 3, 3, **f32)
    # per-sample conv: x (2, 4, 6, 7), weight (2, 8, 4, 3, 3), same padding
    px, pw, pb = torch.randn(2, 4, 6, 7, **f32), torch.randn(2, 8, 4, 3, 3, **f32), torch.randn(8, **f32)
    pg = torch.randn(2, 8, 6, 7, **f32)
    families = {
        "depthwise_conv2d": [
            ("weight channels", lambda op: op(x, torch.randn(3, 1, 3, 3, **f32), None, one, zero, one)),
            ("stride 0", lambda op: op(x, w, None, [0, 1], zero, one)),
            ("bias dtype", lambda op: op(x, w, torch.randn(2, device=device, dtype=torch.float64), one, zero, one)),
            ("input rank", lambda op: op(x[0], w, None, one, zero, one)),
        ],
        "depthwise_conv2d_backward_input": [
            ("grad channels", lambda op: op(g[:, :1], x, w, one, zero, one)),
        ],
        "depthwise_conv2d_backward_weight": [
            ("grad dtype", lambda op: op(g.double(), x, w, one, zero, one)),
        ],
        "kw_assemble": [
            ("attention mixtures", lambda op: op(att[:, :5], wh, layout)),
            ("attention dtype", lambda op: op(att.double(), wh, layout)),
            ("cells do not divide", lambda op: op(att, wh, [7, 6, 3, 3])),
        ],
        "kw_assemble_backward_attention": [
            ("grad shape", lambda op: op(kgrad[:, :4], wh, layout)),
        ],
        "kw_assemble_backward_warehouse": [
            ("grad shape", lambda op: op(kgrad[:, :4], att, wh, layout)),
        ],
        "per_sample_conv2d": [
            ("weight batch", lambda op: op(px, pw[:1], pb, one, one, one, 1)),
            ("groups do not divide", lambda op: op(px, pw, pb, one, one, one, 3)),
            ("bias shape", lambda op: op(px, pw, pb[:3], one, one, one, 1)),
        ],
        "per_sample_conv2d_backward_input": [
            ("grad channels", lambda op: op(pg[:, :3], px, pw, one, one, one, 1)),
        ],
        "per_sample_conv2d_backward_weight": [
            ("grad channels", lambda op: op(pg[:, :3], px, pw, one, one, one, 1)),
        ],
    }
    cases = []
    triton_ok = _backend.HAS_TRITON and (device == "cuda" or _backend.TRITON_INTERPRET)
    for op_name, bad_calls in families.items():
        variants = []
        if _extension.HAS_C:
            variants.append(op_name)
        if triton_ok:
            variants.append(f"{op_name}_triton")
        for variant in variants:
            op = getattr(r, variant)
            for what, call in bad_calls:
                cases.append((f"{variant}: {what}", lambda op=op, call=call: call(op)))
    if triton_ok:
        cases.append(("kw_conv2d_fused_triton: attention batch",
                      lambda: r.kw_conv2d_fused_triton(px, att[:1], torch.randn(5, 4, 4, 1, 1, **f32),
                                                       [8, 4, 3, 3], None, one, one, one)))
    import repkernels

    cases += [
        ("ops.depthwise_conv2d (auto): input rank", lambda: repkernels.ops.depthwise_conv2d(x[0], w)),
        ("ops.kw_conv2d (auto): layout", lambda: repkernels.ops.kw_conv2d(px, att, wh, [8, 6, 3])),
    ]
    if os.environ.get("REPKERNELS_CANARY_SELFTEST") == "1":  # the canary's own test: one case of each outcome
        cases = [("selftest: raises", lambda: _raise(ValueError("expected"))),
                 ("selftest: aborts", os.abort),
                 ("selftest: returns", lambda: None),
                 ("selftest: raises after the crash", lambda: _raise(RuntimeError("still running")))]
    return cases


def _raise(exc: Exception) -> None:
    raise exc


def _child(device: str, start: int) -> int:
    """Run the cases from ``start`` on, one line per event on stdout (read by the parent)."""
    import torch

    import repkernels  # noqa: F401 - registers the ops
    from repkernels import _backend

    if device == "cpu" and _backend.HAS_TRITON:
        _backend.enable_triton_interpreter()

    cases = _cases(device)
    print(f"COUNT\t{len(cases)}", flush=True)
    for i in range(start, len(cases)):
        name, call = cases[i]
        print(f"START\t{i}\t{name}", flush=True)
        try:
            call()
            outcome = "NORAISE\t"
        except Exception as exc:  # noqa: BLE001 - any Python exception is the expected outcome
            outcome = f"RAISED\t{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a kernel ran on bad arguments: the context is gone
                print(f"END\t{i}\tCUDA_ERROR\t{type(exc).__name__}: {str(exc)[:300]}", flush=True)
                return 3
        print(f"END\t{i}\t{outcome}", flush=True)
    return 0


def run(device: str, python: str = sys.executable) -> list[dict]:
    """Every case, each child restarted after a crash. One dict per case: name, status, detail."""
    results: list[dict] = []
    start, count = 0, None
    while count is None or start < count:
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        if device == "cpu":
            env.setdefault("TRITON_INTERPRET", "1")
        proc = subprocess.Popen([python, "-X", "faulthandler", "-m", "repkernels.bench.canary", "--child",
                                 "--device", device, "--start", str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        current = None
        for line in out.splitlines():
            parts = line.split("\t")
            if parts[0] == "COUNT":
                count = int(parts[1])
            elif parts[0] == "START":
                current = (int(parts[1]), parts[2])
            elif parts[0] == "END" and current:
                status = {"RAISED": "ok", "NORAISE": "no exception", "CUDA_ERROR": "CUDA error"}[parts[2]]
                detail = parts[3] if len(parts) > 3 else ""
                if status == "no exception":
                    detail = "the call returned: bad arguments accepted"
                results.append({"case": current[1], "status": status, "detail": detail})
                current = None
        rc = None if timed_out else proc.returncode
        if count is None:  # the child died before listing the cases (import or set-up failure)
            results.append({"case": "(set-up)", "status": _describe(rc), "detail": err[-3000:]})
            break
        if current is not None:  # died inside a case
            results.append({"case": current[1], "status": _describe(rc), "detail": err[-3000:]})
            start = current[0] + 1
        elif rc == 3:
            start = len(results)
        else:
            break
    return results


def _describe(rc: int | None) -> str:
    if rc is None:
        return f"timed out ({CHILD_TIMEOUT_S} s)"
    if rc < 0:
        try:
            return f"crashed ({signal.Signals(-rc).name})"
        except ValueError:
            return f"crashed (signal {-rc})"
    return f"exited {rc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repkernels.bench.canary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="where the tensors live (default: cuda when a GPU is visible)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return _child(args.device, args.start)
    t0 = time.monotonic()
    results = run(args.device)
    for res in results:
        print(f"{res['status']:<24} {res['case']}" + (f"  [{res['detail'][:160]}]" if res["detail"] else ""))
    bad = [res for res in results if res["status"] != "ok"]
    print(f"canary: {len(results) - len(bad)} raised as they should, {len(bad)} failed "
          f"({time.monotonic() - t0:.0f} s, {args.device})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "results": results}, fh, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
