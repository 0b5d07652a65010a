"""Compile every Triton kernel launch that real workloads make, ahead of time, for GPU targets — no GPU needed.

Run as a script (``python tests/_triton_aot.py``; it imports the installed ``repkernels``) by
``test_triton_kernels_compile.py``, with ``TRITON_INTERPRET`` unset. The launches are recorded by
:mod:`repkernels.bench.triton_launches` (the Triton paths of the ops run on CPU tensors; their kernels are
recorded, not launched); each distinct launch is compiled through Triton's full pipeline for sm_90 and sm_80
and its shared memory checked against the architecture. That catches what the interpreter cannot: compile
errors in GPU lowering and tiles too large for the hardware (an H100 run once failed with 266 KB > 227 KB).

Prints one line per compiled launch and ``OK`` at the end; exits 1 listing the failures otherwise, or
prints ``SKIP <reason>`` and exits 0 when this Triton has no ahead-of-time compile API.
"""

from __future__ import annotations

import multiprocessing
import os
import sys


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    from repkernels.bench import triton_launches as tl

    reason = tl.aot_available()
    if reason:
        print("SKIP", reason)
        return 0
    launches = tl.record_launches()
    jobs = [(tl.label_of(fn, signature, constexprs), fn, signature, constexprs, attrs, options, cc)
            for fn, signature, constexprs, attrs, options in launches for cc in (90, 80)]
    _JOBS[:] = jobs
    with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        results = pool.map(_compile, range(len(jobs)), chunksize=1)
    failures = []
    for (label, *_, options, cc), (shared, status) in zip(jobs, results):
        print(f"sm_{cc} shared={shared:>6} {status:<4} {label} {options}")
        if status != "ok":
            failures.append(f"sm_{cc} {label}: {status}")
    print(f"{len(launches)} distinct launches")
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    print("OK")
    return 0


_JOBS: list[tuple] = []   # (label, fn, signature, constexprs, attrs, options, cc), read by the forked workers


def _compile(index: int) -> tuple[int, str]:
    """(shared memory bytes, "ok" or what is wrong) for one launch on one target."""
    from repkernels.bench.triton_launches import SHARED_LIMIT, compile_launch

    label, fn, signature, constexprs, attrs, options, cc = _JOBS[index]
    try:
        kernel = compile_launch(fn, signature, constexprs, attrs, options, cc)
    except Exception as exc:  # noqa: BLE001 - every compile error is a failure to report
        return -1, f"COMPILE ERROR {type(exc).__name__}: {str(exc)[-600:]}"
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT[cc]:
        return shared, f"TOO MUCH SHARED MEMORY (limit {SHARED_LIMIT[cc]})"
    # The bf16 Toeplitz GEMMs with 64-row tiles are meant for Hopper's warpgroup tensor-core instructions.
    if (cc == 90 and fn.__name__ == "depthwise_conv2d_toeplitz_kernel" and "*bf16" in signature.values()
            and "BLOCK_R=64" in label and "wgmma" not in kernel.asm["ptx"]):
        return shared, "bf16 Toeplitz GEMM does not use Hopper tensor cores (no wgmma in the PTX)"
    return shared, "ok"


if __name__ == "__main__":
    sys.exit(main())
