"""The compiled-code report (``python -m repkernels.bench --static``): registers, spills, shared memory, resident
blocks and FMAs per load of every CUDA kernel and of the Triton launches of the depthwise bench shapes (and the
KW, multibranch and per-sample conv workloads), read from the code compiled for sm_90 — no GPU needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repkernels import _backend
from repkernels.bench import static

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"kernel", "regs", "spill_bytes", "smem_bytes", "blocks_per_sm", "fma_per_load"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if static.tool("nvcc") is None or static.tool("cuobjdump") is None or not _backend.HAS_TRITON:
        pytest.skip("needs nvcc and Triton (whose package carries cuobjdump)")
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "repkernels.bench", "--static", "--triton-workloads",
                           "depthwise,kernelwarehouse,multibranch,per_sample,per_sample_tma", "--json",
                           str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["kernels"]


def _direct(report, name):
    return [k for k in report if k["source"] == "cuda" and f"dw::(anonymous namespace)::{name}<" in k["kernel"]]


def test_report_covers_every_kernel_with_the_fields(report):
    assert all(FIELDS <= set(k) for k in report)
    cuda = [k for k in report if k["source"] == "cuda"]
    triton = [k for k in report if k["source"] == "triton"]
    assert any("gemm_kernel" in k["kernel"] for k in cuda)                      # KernelWarehouse / Toeplitz GEMMs
    # (the input gradient runs forward_kernel: one forward problem per class of input positions)
    for name in ("forward_kernel", "forward_small_kernel", "forward_direct_kernel", "backward_weight_kernel",
                 "backward_weight_rt_kernel"):
        assert _direct(report, name), name
    assert {k["kernel"].split()[0] for k in triton} >= {"depthwise_conv2d_toeplitz_kernel",
                                                        "depthwise_conv2d_toeplitz_wgrad_kernel"}
    for k in report:
        assert 0 < k["regs"] <= 255 and k["spill_bytes"] >= 0 and k["smem_bytes"] >= 0, k
        assert k["blocks_per_sm"] is None or 1 <= k["blocks_per_sm"] <= 32, k
    # the direct kernels' inner loops are FMA loops reading shared or global memory
    for k in (_direct(report, "forward_kernel") + _direct(report, "forward_small_kernel") +
              _direct(report, "backward_weight_rt_kernel")):
        assert k["fma_per_load"] is not None and k["loop_fmas"] > 0 and k["loop_loads"] > 0, k


def test_issue16_direct_kernels_do_8_fmas_per_load(report):
    # the register tiles: forward and input gradient, 3 dtypes x (6 compile-time tap counts + generic), the small-map
    # and channel-group forward, 3 dtypes x (4 compile-time tap counts + generic), and weight gradient, 3 dtypes x
    # (large-map and small-map tiles) and its channels_last tile, 3 dtypes (the kDirect kernels, for strides no window
    # can stage, are not)
    tiles = (_direct(report, "forward_kernel") + _direct(report, "forward_small_kernel") +
             _direct(report, "backward_weight_rt_kernel"))
    assert len(tiles) == 45, [k["kernel"] for k in tiles]
    for k in tiles:
        assert k["fma_per_load"] is not None and k["fma_per_load"] >= 8, k


def _hot(report, source):
    return [k for k in report if k["source"] == source and ("toeplitz" in k["kernel"] or "_kernel<" in k["kernel"])]


def test_issue16_hot_cuda_kernels_do_not_spill(report):
    hot = _hot(report, "cuda")
    assert any("rk::dw::" in k["kernel"] for k in hot) and any("rk::kw::" in k["kernel"] for k in hot)
    assert hot and all(k["spill_bytes"] == 0 for k in hot), [k["kernel"] for k in hot if k["spill_bytes"]]


def test_issue16_hot_triton_kernels_do_not_spill(report):
    hot = _hot(report, "triton")
    assert hot and all(k["spill_bytes"] == 0 for k in hot), [k["kernel"] for k in hot if k["spill_bytes"]]


SASS = """
        Function : kern
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   LDS R5, [R6] ;
        /*0040*/                   FFMA R3, R5, R2, R3 ;
        /*0050*/                   FFMA R7, R5, R5, R7 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   HFMA2 R8, R8, R8, R8 ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
"""


def test_inner_loop_is_the_innermost_fma_loop():
    instrs = static.parse_sass(SASS)["kern"]
    assert [op for _, op, _ in instrs][:3] == ["MOV", "LDG.E", "FFMA"]
    # loops [0x30, 0x60] (inside) and [0x10, 0x80]: the inner one has 2 FFMA and 1 LDS
    assert static.inner_loop_fma_per_load(instrs) == (2.0, 2, 1)
    assert static.inner_loop_fma_per_load([(0, "FFMA", ""), (16, "EXIT", "")]) == (None, 0, 0)


def test_blocks_per_sm_from_registers_threads_and_shared_memory():
    assert static.blocks_per_sm(32, 256, 0) == 8                  # threads: 2048 / 256
    assert static.blocks_per_sm(255, 128, 0) == 2                 # registers: 256 per thread -> 32768 per block
    assert static.blocks_per_sm(32, 128, 100 * 1024) == 2         # shared memory: 228 KB / (100 KB + 1 KB)
    assert static.blocks_per_sm(32, None, 0) is None


def test_kernelwarehouse_kernels_do_not_spill(report):
    """Issue 12: no KW hot kernel spills (the fused assembly-in-conv kernel spilled 352-408 B, the conv wgrad GEMM
    16 B, the per-sample dgrad 24-48 B, the assembly backward 8 B) and the assembly forward uses 64-row tiles."""
    cuda = [k for k in report if k["source"] == "cuda" and "rk::gemm::gemm_kernel<rk::kw::" in k["kernel"]]
    triton = [k for k in report if k["source"] == "triton" and k["kernel"].startswith(("kw_", "per_sample_"))]
    assert len(cuda) == 36, [k["kernel"] for k in cuda]           # 6 problems x 3 dtypes x 2 tile shapes
    assert {k["kernel"].split()[0] for k in triton} >= {
        "kw_assemble_fwd_kernel", "kw_assemble_bwd_attention_kernel", "kw_assemble_bwd_warehouse_kernel",
        "kw_conv2d_fused_fwd_kernel", "per_sample_conv2d_fwd_kernel", "per_sample_conv2d_bwd_input_kernel",
        "per_sample_conv2d_bwd_weight_kernel"}
    assert not [k["kernel"] for k in cuda + triton if k["spill_bytes"]]
    assert all("BLOCK_R=64" in k["kernel"] for k in triton if k["kernel"].startswith("kw_assemble_fwd_kernel"))


def test_multibranch_stats_kernels_do_not_spill(report):
    """The PBConv statistics kernel (implicit GEMM, tap-major for >= 16 channels per group): with 4 warps its fp32
    3x3 tiles spilled 24 B once the report compiled with Triton's argument specialization; 8 warps, no spill. With
    Triton's 3 pipeline stages the fp32 tiles took 170-255 registers (one block per SM); one stage: at most 128,
    two blocks per SM."""
    stats = [k for k in report if k["source"] == "triton" and k["kernel"].startswith("multibranch_conv_stats_kernel")]
    assert any("TAP_MAJOR=True" in k["kernel"] for k in stats)
    assert not [k["kernel"] for k in stats if k["spill_bytes"]]
    fp32 = [k for k in stats if k["kernel"].split()[1].startswith("*fp32")]
    assert fp32 and not [k["kernel"] for k in fp32 if k["blocks_per_sm"] < 2]
    assert not [k["kernel"] for k in stats if k["regs"] >= 200]


# the per_sample workload's fp32 forwards: (KH, BLOCK_O, BLOCK_P) of 3x3 128->32 at 56x56 and 7x7, 1x1 128->16 at
# 56x56 and 128->32 at 7x7
SPILLED_FWD_TILES = {(3, 32, 128), (3, 32, 64), (1, 16, 128), (1, 32, 64)}


def _constexpr(label, name):
    return int(next(w for w in label.split() if w.startswith(name + "=")).split("=")[1])


def test_per_sample_conv_forward_does_not_spill(report):
    """Issue 12: the fp32 channels_last per-sample forward with tiles narrower than 64 output channels spilled 8 B
    on sm_90 with 32-channel steps (3x3 128->32: 32 x 128 tiles held to 128 registers with 8 warps, 32 x 64 with 4;
    1x1: 16 x 128 at 80 registers, 32 x 64 at 72). With 16-channel steps, 4 warps and 2 stages: no spill, and no
    fewer resident blocks than before (2, 4, 6, 7)."""
    fwd = [k for k in report if k["source"] == "triton" and k["kernel"].startswith("per_sample_conv2d_fwd_kernel")]
    fp32 = [k for k in fwd if k["kernel"].split()[1].startswith("*fp32")
            and (_constexpr(k["kernel"], "KH"), _constexpr(k["kernel"], "BLOCK_O"),
                 _constexpr(k["kernel"], "BLOCK_P")) in SPILLED_FWD_TILES]
    assert {(_constexpr(k["kernel"], "KH"), _constexpr(k["kernel"], "BLOCK_O"), _constexpr(k["kernel"], "BLOCK_P"))
            for k in fp32} == SPILLED_FWD_TILES
    assert all("BLOCK_K=16 " in k["kernel"] and "warps=4 stages=2" in k["kernel"] for k in fp32), fp32
    before = {(3, 32, 128): 2, (3, 32, 64): 4, (1, 16, 128): 6, (1, 32, 64): 7}
    for k in fp32:
        tile = (_constexpr(k["kernel"], "KH"), _constexpr(k["kernel"], "BLOCK_O"), _constexpr(k["kernel"], "BLOCK_P"))
        assert k["blocks_per_sm"] >= before[tile], k
    assert not [k["kernel"] for k in fwd if k["spill_bytes"]]


def test_tma_per_sample_forward_does_not_spill(report):
    """Issue 12's TMA per-sample forward (opt-in) on the ResNet-50 stage shapes of the per_sample_tma workload (5
    layers x fp32 / bf16): no spill, at least 2 blocks per SM, within sm_90's shared memory."""
    from repkernels.bench.triton_launches import SHARED_LIMIT, TMA_LAYERS

    tma = [k for k in report if k["source"] == "triton" and k["kernel"].startswith("per_sample_conv2d_fwd_tma_kernel")]
    assert len(tma) == 2 * len(TMA_LAYERS), [k["kernel"] for k in tma]
    assert not [k["kernel"] for k in tma if k["spill_bytes"] or k["blocks_per_sm"] < 2]
    assert all(k["smem_bytes"] <= SHARED_LIMIT[90] for k in tma)


def test_tma_per_sample_forward_compiles_to_tma_copies_and_warpgroup_mma():
    """The descriptor loads become TMA copies and the dots warpgroup MMAs on sm_90 (PTX of the per_sample_tma
    workload's bf16 launches); on sm_80 (no TMA; the op never routes there) the kernel still compiles."""
    if not _backend.HAS_TRITON:
        pytest.skip("needs Triton")
    script = (
        "import torch\n"
        "from repkernels.bench import triton_launches as tl\n"
        "for fn, sig, ce, attrs, opts in tl.record_launches(['per_sample_tma'], (torch.bfloat16,)):\n"
        "    if fn.__name__ != 'per_sample_conv2d_fwd_tma_kernel':\n"
        "        continue\n"
        "    ptx = tl.compile_launch(fn, sig, ce, attrs, opts, 90).asm['ptx']\n"
        "    print('sm90', ptx.count('cp.async.bulk.tensor') > 0, ptx.count('wgmma.mma_async') > 0)\n"
        "    print('sm80', bool(tl.compile_launch(fn, sig, ce, attrs, opts, 80).asm['cubin']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines.count("sm90 True True") == 5, proc.stdout
    assert lines.count("sm80 True") == 5, proc.stdout


# kernel: distinct launches per dtype on TMA_LAYERS (the wgrad's tiles do not depend on the channel counts past
# the chunk, nor its constexprs on the map, so 3x3 64->64 @56² and 512->512 @7² are one launch)
TMA_BWD_KERNELS = {"per_sample_conv2d_bwd_input_tma_kernel": 5, "per_sample_conv2d_bwd_weight_tma_kernel": 4}


def test_tma_per_sample_backward_does_not_spill(report):
    """Issue 12's TMA per-sample dgrad and wgrad (opt-in) on the ResNet-50 stage shapes of the per_sample_tma
    workload (5 layers x fp32 / bf16): no spill, at least 2 blocks per SM, within sm_90's shared memory."""
    from repkernels.bench.triton_launches import SHARED_LIMIT

    for name, launches in TMA_BWD_KERNELS.items():
        tma = [k for k in report if k["source"] == "triton" and k["kernel"].startswith(name + " ")]
        assert len(tma) == 2 * launches, (name, [k["kernel"] for k in tma])
        assert not [k["kernel"] for k in tma if k["spill_bytes"] or k["blocks_per_sm"] < 2]
        assert all(k["smem_bytes"] <= SHARED_LIMIT[90] for k in tma)


def test_tma_per_sample_backward_compiles_to_tma_copies_and_warpgroup_mma():
    """The dgrad's and wgrad's descriptor loads become TMA copies and their dots warpgroup MMAs on sm_90 (PTX of
    the per_sample_tma workload's bf16 launches). The wgrad's loop (SASS) loads one grad_out box and TAPS input
    boxes an iteration (1 + TAPS ``UTMALDG``) for TAPS dots over the box's pixels (m64n64k16: BH·BW/16
    ``HGMMA`` each): 3 taps a program for the 3x3 layers, 1 for the 1x1."""
    if not _backend.HAS_TRITON or static.tool("cuobjdump") is None:
        pytest.skip("needs Triton (whose package carries cuobjdump)")
    script = (
        "import subprocess, tempfile, torch\n"
        "from repkernels.bench import static, triton_launches as tl\n"
        f"names = {tuple(TMA_BWD_KERNELS)!r}\n"
        "for fn, sig, ce, attrs, opts in tl.record_launches(['per_sample_tma'], (torch.bfloat16,)):\n"
        "    if fn.__name__ in names:\n"
        "        kernel = tl.compile_launch(fn, sig, ce, attrs, opts, 90)\n"
        "        ptx = kernel.asm['ptx']\n"
        "        print(fn.__name__, ptx.count('cp.async.bulk.tensor') > 0, ptx.count('wgmma.mma_async') > 0)\n"
        "    if fn.__name__ == 'per_sample_conv2d_bwd_weight_tma_kernel':\n"
        "        const = {fn.arg_names[i[0]]: v for i, v in ce.items()}\n"
        "        with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:\n"
        "            cubin.write(kernel.asm['cubin'])\n"
        "            cubin.flush()\n"
        "            sass = subprocess.run([static.tool('cuobjdump'), '-sass', cubin.name], capture_output=True,\n"
        "                                  text=True, check=True).stdout\n"
        "        for body in static.innermost_loop_bodies(next(iter(static.parse_sass(sass).values()))):\n"
        "            if any(op.startswith('HGMMA') for op in body):\n"
        "                print('wgrad loop', const['KH'] * const['KW'], const['TAPS'], const['BH'] * const['BW'],\n"
        "                      sum(op.startswith('UTMALDG') for op in body), sum(op.startswith('HGMMA') for op in body))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    for name, launches in TMA_BWD_KERNELS.items():
        assert lines.count(f"{name} True True") == launches, proc.stdout
    loops = [tuple(map(int, line.split()[2:])) for line in lines if line.startswith("wgrad loop")]
    assert sorted((taps, group) for taps, group, *_ in loops) == [(1, 1), (9, 3), (9, 3), (9, 3)], proc.stdout
    assert all(tma == 1 + group and mma == group * pixels // 16 for _, group, pixels, tma, mma in loops), proc.stdout