"""``python -m repkernels info``: versions, build, GPU and usable backends."""

from __future__ import annotations

import argparse
import os
import sys


def info() -> str:
    import torch

    import repkernels
    from repkernels import _backend, _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    build = _extension.build_info()
    lines = [
        f"repkernels      {repkernels.__version__} ({os.path.dirname(repkernels.__file__)})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"triton          {triton_version}",
        f"backend         {_backend.get_backend()} (set with {_backend.ENV_VAR} or repkernels.backend())",
    ]
    if build["built"]:
        lines.append(f"_C extension    built for CUDA {build['cuda_version']}, archs {build['cuda_archs']}, "
                     f"against torch {build['torch_version']}")
    else:
        lines.append(f"_C extension    not built: {build['reason']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}           {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
    else:
        lines.append("GPU             none visible")
    lines.append("backends:")
    for name, status in _backend.usable_backends().items():
        lines.append(f"  {name:<10}    {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, build information, the GPU and usable backends")
    sub.add_parser("bench", help="run the microbenchmarks (same as python -m repkernels.bench)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from repkernels.bench.__main__ import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
