"""``python -m repkernels.bench``: check and time every op against the best PyTorch option and the roofline.

Without a GPU there is nothing to time: each backend's output is still checked against the float64
reference (on shrunken shapes; Triton under its interpreter) and the run exits 0 when all agree.
Exit status 1 means some implementation gave a wrong result.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# --- optional dependencies -------------------------------------------------------------------------------------
# What a suite imports when it runs, beyond torch and repkernels. A missing one is named before any case runs (exit
# status 2), instead of surfacing as an implementation that "disagrees with the reference".
SUITE_DEPENDENCIES = {"kernelwarehouse": ("torchvision",), "multibranch_conv_bn": ("torchvision",)}


def missing_dependency(ops: list[str]) -> str | None:
    """A message naming the first optional dependency of the selected suites that cannot be imported, else None."""
    for module in sorted({m for op in ops for m in SUITE_DEPENDENCIES.get(op, ())}):
        users = ",".join(op for op in ops if module in SUITE_DEPENDENCIES.get(op, ()))
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - absent, or installed for another torch (fails to import)
            install = f"pip install {module}"
            if module == "torchvision":
                import torch

                minor = int(torch.__version__.split(".")[1])
                install = f"pip install 'torchvision==0.{minor + 15}.*' (the release for torch {torch.__version__})"
            what = (f"missing optional dependency {module}" if isinstance(exc, ModuleNotFoundError)
                    and exc.name == module else f"optional dependency {module} fails to import ({exc})")
            return f"{what}: {install} (or make bench); needed by --ops {users} (leave those out with --ops)"
    return None
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if "--static" in args_in:  # the compiled-code report: no timing, no interpreter
        from .static import main as static_main

        return static_main(args_in)
    parser = argparse.ArgumentParser(prog="python -m repkernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="all", help="comma-separated ops to run (default: all): "
                        "see --list")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated dtypes among fp32, fp16, bf16 "
                        "(default: fp32,bf16)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--out", default="bench_out", help="folder for the JSON results and the PNG plot "
                        "(default: ./bench_out)")
    parser.add_argument("--name", default=None, help="file stem of the JSON/PNG results (default: "
                        "bench_<device>)")
    parser.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                        help="seconds the torch.compile baselines may spend compiling in this run; the ones "
                        "after that are reported as skipped (default: REPKERNELS_BENCH_COMPILE_BUDGET_S, "
                        "else no limit)")
    parser.add_argument("--list", action="store_true", help="list the ops that have a suite and exit")
    parser.add_argument("--static", action="store_true", help="instead of running: the compiled-code report "
                        "(registers, spills, shared memory, FMAs per load of every CUDA and Triton kernel; see "
                        "python -m repkernels.bench --static --help)")
    args = parser.parse_args(argv)

    import torch

    from repkernels import _backend

    if not torch.cuda.is_available() and _backend.HAS_TRITON:
        _backend.enable_triton_interpreter()  # the only way Triton kernels run here

    from . import harness
    from .suites import SUITES

    if args.list:
        print("\n".join(SUITES))
        return 0
    ops = list(SUITES) if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    problem = missing_dependency(ops)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        dtypes = [harness.DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    except KeyError as exc:
        parser.error(f"unknown dtype {exc.args[0]!r}; choose from {', '.join(harness.DTYPES)}")

    if args.compile_budget is not None:
        harness.COMPILE_BUDGET.seconds = args.compile_budget
    env = harness.environment()
    print(f"repkernels {env['repkernels']} ({env['commit']}) | torch {env['torch']} | CUDA {env['cuda']} | "
          f"triton {env['triton']}", flush=True)
    print(f"device: {env['device']}", flush=True)
    if env["ceilings"]:
        c = env["ceilings"]
        print(f"roofline ceilings: copy {c['copy_GBps']:.0f} GB/s, tensor cores (bf16) {c['tensor_TFLOPs']:.0f} "
              f"TFLOP/s (both measured), fp32 FMA {c['fp32_TFLOPs']} TFLOP/s ({c['sources']['fp32_TFLOPs']})",
              flush=True)
    if not torch.cuda.is_available():
        print("No GPU visible: timings need a GPU. Checking each backend's output against the reference "
              "on shrunken shapes instead.")
    else:
        torch.backends.cudnn.benchmark = True

    cases = [c for op in ops for c in SUITES[op](dtypes, args.quick)]
    records = harness.run_cases(cases, args.quick, log=lambda line: print(line, flush=True))
    print(harness.format_table(records))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "bench_" + "".join(ch if ch.isalnum() else "_" for ch in env["device"]).strip("_")
    harness.write_json(out / f"{stem}.json", env, records)
    print(f"results: {out / (stem + '.json')}")
    # the speed-ups on a GPU; without one, each implementation's error against the reference and the tolerance
    if harness.write_plot(out / f"{stem}.png", records, env["device"]):
        print(f"plot: {out / (stem + '.png')}")
    else:
        try:
            import matplotlib  # noqa: F401

            print("plot: skipped (nothing to plot)")
        except ImportError:
            print("plot: skipped (pip install matplotlib)")
    bad = [r for r in records if r["check"] not in harness.PASSING_CHECKS]
    if bad:
        print(f"{len(bad)} implementation(s) disagree with the reference, failed or could not be checked: "
              "see the check column",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
