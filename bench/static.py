"""The compiled-code report: what each GPU kernel costs on the chip, read from its code, no GPU needed.

``python -m repkernels.bench --static [--json PATH] [--arch 90] [--triton-workloads depthwise,...]`` compiles

* every CUDA kernel of ``csrc/`` (nvcc ``-cubin`` for sm_<arch>, the extension's flags), and
* every Triton launch that the bench shapes make (recorded by :mod:`repkernels.bench.triton_launches`,
  compiled through Triton's pipeline),

and reports per kernel: ``regs`` (registers per thread), ``spill_bytes`` (local memory per thread, stack frame
included: register spills, or register arrays indexed at run time — both the slow path), ``smem_bytes`` (static shared memory, plus
Triton's dynamic allocation; ``dynamic_smem`` marks CUDA kernels whose shared memory is sized at launch),
``threads`` (per block), ``blocks_per_sm`` (resident blocks an SM can hold by registers, threads and shared
memory; Hopper limits), and for the innermost FMA loop read from the SASS (``cuobjdump``/``nvdisasm``)
``fma_per_load``: FMA instructions (FFMA/HFMA2/…) per load instruction (shared, global, local) in that loop
(``null`` where the kernel has no FMA loop, e.g. tensor-core GEMMs). These are properties of the compiled code,
not timings: the evidence that a kernel can reach its roofline (no spills, many FMAs per load, enough resident
warps), checked in CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path



def source_root() -> Path:
    """The checkout holding csrc/: the current folder, or the one this file lies in (editable installs)."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "csrc").is_dir():
            return candidate
    raise RuntimeError("the CUDA report compiles csrc/: run it from a source checkout of repkernels")


# Hopper (sm_90) per-SM limits: threads, blocks, 32-bit registers (allocated per warp in units of 256),
# shared memory (228 KB, of which 1 KB per block is reserved by the system).
SM_LIMITS = {"threads": 2048, "blocks": 32, "regs": 65536, "smem": 233472, "smem_reserved": 1024}
FMA_OPS = ("FFMA", "HFMA2", "DFMA", "FFMA2")
LOAD_OPS = ("LDS", "LDG", "LDL", "LDSM", "LD")


@dataclasses.dataclass
class KernelReport:
    kernel: str
    source: str                 # "cuda" (csrc) or "triton"
    regs: int
    spill_bytes: int
    smem_bytes: int
    threads: int | None
    blocks_per_sm: int | None
    fma_per_load: float | None
    loop_fmas: int = 0
    loop_loads: int = 0
    dynamic_smem: bool = False
    detail: str = ""

    def row(self) -> dict:
        return dataclasses.asdict(self)


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool: on PATH, in the toolkit, or the copy Triton's package carries."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(path) if path.is_file() else None
    except ImportError:
        return None


def blocks_per_sm(regs: int, threads: int | None, smem: int | None) -> int | None:
    if not threads:
        return None
    warps = -(-threads // 32)
    limits = [SM_LIMITS["blocks"], SM_LIMITS["threads"] // threads]
    if regs:
        per_warp = -(-max(regs, 1) * 32 // 256) * 256
        limits.append(SM_LIMITS["regs"] // (per_warp * warps))
    if smem is not None:
        limits.append(SM_LIMITS["smem"] // (smem + SM_LIMITS["smem_reserved"]))
    return max(min(limits), 0)


_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """{function name: [(address, opcode, operands)]} from ``cuobjdump -sass`` / ``nvdisasm`` output."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def _base(opcode: str) -> str:
    return opcode.split(".")[0]


def innermost_loop_bodies(instrs: list[tuple[int, str, str]]) -> list[list[str]]:
    """The opcodes of each innermost loop. A loop is a backward branch (``BRA`` to a lower address): its body is
    [target, branch]. Innermost loops contain no other loop."""
    loops = []
    for addr, op, operands in instrs:
        if _base(op) == "BRA":
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [[op for addr, op, _ in instrs if start <= addr <= end] for start, end in innermost]


def inner_loop_fma_per_load(instrs: list[tuple[int, str, str]]) -> tuple[float | None, int, int]:
    """(FMAs per load, FMAs, loads) in the innermost loop holding the most FMAs
    (:func:`innermost_loop_bodies`); (None, 0, 0) without one."""
    best = (None, 0, 0)
    for body in innermost_loop_bodies(instrs):
        fmas = sum(_base(op) in FMA_OPS for op in body)
        loads = sum(_base(op) in LOAD_OPS for op in body)
        if fmas > best[1]:
            best = ((fmas / loads) if loads else None, fmas, loads)
    return best


def _static_smem(res: dict[str, int]) -> int:
    """cuobjdump's SHARED counts the 1 KB the system reserves per block: the kernel's own static bytes."""
    return max(res.get("SHARED", 0) - SM_LIMITS["smem_reserved"], 0)


def _resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    text = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}
            current = None
    return out


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def cuda_report(arch: int = 90, sources: Iterable[Path] | None = None) -> list[KernelReport]:
    """Compile each ``csrc/**/*.cu`` for sm_<arch> and report every kernel in it."""
    nvcc = tool("nvcc")
    if nvcc is None or tool("cuobjdump") is None:
        raise RuntimeError("the CUDA report needs nvcc and cuobjdump (CUDA toolkit, or Triton's package)")
    root = source_root()
    sources = sorted((root / "csrc").rglob("*.cu")) if sources is None else list(sources)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cubin, ptx = Path(tmp) / (src.stem + ".cubin"), Path(tmp) / (src.stem + ".ptx")
            common = [nvcc, "-std=c++20", "-O3", "-lineinfo", f"-arch=sm_{arch}", f"-I{root / 'csrc'}", str(src)]
            subprocess.run(common + ["-cubin", "-o", str(cubin)], check=True, capture_output=True, text=True)
            subprocess.run(common + ["-ptx", "-o", str(ptx)], check=True, capture_output=True, text=True)
            threads, dynamic = _ptx_entries(ptx.read_text())
            usage = _resource_usage(cubin)
            sass = parse_sass(subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                             text=True, check=True).stdout)
            names = _demangle(usage)
            for mangled, res in usage.items():
                fpl, fmas, loads = inner_loop_fma_per_load(sass.get(mangled, []))
                smem = _static_smem(res)
                reports.append(KernelReport(
                    kernel=names[mangled], source="cuda", regs=res.get("REG", 0),
                    spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
                    smem_bytes=smem, threads=threads.get(mangled), dynamic_smem=mangled in dynamic,
                    blocks_per_sm=blocks_per_sm(res.get("REG", 0), threads.get(mangled),
                                                None if mangled in dynamic else smem),
                    fma_per_load=fpl, loop_fmas=fmas, loop_loads=loads,
                    detail=f"{src.relative_to(root)}" + ("; shared memory sized at launch" if mangled in dynamic
                                                         else "")))
    return reports


def _ptx_entries(ptx: str) -> tuple[dict[str, int], set[str]]:
    """({entry: max threads per block from .maxntid}, {entries using dynamic shared memory})."""
    threads, dynamic = {}, set()
    extern = re.findall(r"\.extern \.shared [^\n]*?(\w+)\[\];", ptx)
    for m in re.finditer(r"\.entry\s+(\S+?)\s*\((.*?)\n\}", ptx, re.DOTALL):
        name, body = m.group(1), m.group(0)
        nt = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", body)
        if nt:
            threads[name] = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3))
        if any(var in body for var in extern):
            dynamic.add(name)
    return threads, dynamic


def triton_report(arch: int = 90, workloads: Iterable[str] | None = None) -> list[KernelReport]:
    """Record the Triton launches of the workloads (default: all) and report each compiled launch."""
    from . import triton_launches as tl

    reason = tl.aot_available()
    if reason:
        raise RuntimeError(f"this Triton cannot compile ahead of time: {reason}")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (fn, signature, constexprs, attrs, options) in enumerate(tl.record_launches(workloads)):
            kernel = tl.compile_launch(fn, signature, constexprs, attrs, options, arch)
            cubin = Path(tmp) / f"k{i}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            res = next(iter(_resource_usage(cubin).values()), {})
            sass = parse_sass(subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                             text=True, check=True).stdout)
            fpl, fmas, loads = inner_loop_fma_per_load(next(iter(sass.values()), []))
            threads = 32 * kernel.metadata.num_warps
            smem = _static_smem(res) + kernel.metadata.shared
            reports.append(KernelReport(
                kernel=tl.label_of(fn, signature, constexprs) + f" warps={kernel.metadata.num_warps} "
                f"stages={kernel.metadata.num_stages}", source="triton", regs=res.get("REG", 0),
                spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0), smem_bytes=smem, threads=threads,
                blocks_per_sm=blocks_per_sm(res.get("REG", 0), threads, smem), fma_per_load=fpl, loop_fmas=fmas,
                loop_loads=loads))
    return reports


def format_report(reports: list[KernelReport]) -> str:
    head = f"{'regs':>5} {'spill':>6} {'smem':>7} {'thr':>5} {'blk/SM':>6} {'FMA/ld':>7}  kernel"
    lines = [head, "-" * 100]
    for r in reports:
        fpl = f"{r.fma_per_load:7.2f}" if r.fma_per_load is not None else f"{'-':>7}"
        smem = f"{r.smem_bytes}{'+' if r.dynamic_smem else ''}"
        lines.append(f"{r.regs:5d} {r.spill_bytes:6d} {smem:>7} {r.threads or '-':>5} {r.blocks_per_sm or '-':>6} "
                     f"{fpl}  [{r.source}] {r.kernel}")
    lines.append("spill = local memory per thread (bytes); smem = static shared memory (+: more sized at launch); "
                 "FMA/ld = FMAs per load instruction in the innermost FMA loop (SASS)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m repkernels.bench --static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90: H100/H200)")
    parser.add_argument("--triton-workloads", default="all",
                        help="comma-separated among depthwise, kernelwarehouse, multibranch, per_sample, per_sample_tma, or 'none' "
                        "(default all)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    reports = cuda_report(args.arch)
    if args.triton_workloads != "none":
        names = None if args.triton_workloads == "all" else [w.strip() for w in args.triton_workloads.split(",")]
        reports += triton_report(args.arch, names)
    print(format_report(reports))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": f"sm_{args.arch}", "kernels": [r.row() for r in reports]},
                                              indent=2))
        print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
