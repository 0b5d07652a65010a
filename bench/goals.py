"""The speed goals of the open issues and the README, evaluated on bench results.

Each :class:`Goal` selects bench rows (suite, op, case pattern, implementation, dtype), reads one metric of
each (``pct_roofline``, ``x_best_torch``, ``x_baseline`` or its inverse, the time ratio) and compares the
worst row with the target, per dtype. A goal none of whose rows was timed is "not measured", with the reason.
``python -m repkernels.bench.summary`` prints them as the GPU check's table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

_KERNEL = re.compile(r"k(\d+)x(\d+)$")


def kernel_side(case: str) -> int:
    """Largest kernel side of a depthwise bench case name (``... k31x31``)."""
    m = _KERNEL.search(case)
    return max(int(m.group(1)), int(m.group(2))) if m else 0


@dataclasses.dataclass(frozen=True)
class Goal:
    source: str                      # where the goal is stated: "#16", "README"
    text: str                        # what is measured
    suite: str                       # bench suite whose results hold the rows
    metric: str                      # record field: pct_roofline, x_best_torch, x_baseline, time_ratio
    target: float
    select: Callable[[dict], bool]   # which rows (op/case) count
    impls: tuple[str, ...] = ("auto",)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    at_most: bool = False            # the target is an upper bound (time ratios)
    unit: str = "x"

    def target_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self._fmt(self.target)}"

    def _fmt(self, v: float) -> str:
        return f"{v:.1f} %" if self.unit == "%" else f"{v:.2f}x"

    def value(self, rec: dict) -> float | None:
        if self.metric == "time_ratio":  # this row's time over the baseline's: 1 / x_baseline
            x = rec.get("x_baseline")
            return 1.0 / x if x else None
        return rec.get(self.metric)

    def evaluate(self, records: list[dict]) -> dict:
        """{'measured': text, 'met': True/False/None, 'rows': n} over the worst row per dtype."""
        parts, met, rows = [], True, 0
        for dtype in self.dtypes:
            vals = [(self.value(r), r) for r in records if r.get("dtype") == dtype and r.get("impl") in self.impls
                    and self.select(r)]
            vals = [(v, r) for v, r in vals if v is not None]
            if not vals:
                continue
            rows += len(vals)
            v, r = (max if self.at_most else min)(vals, key=lambda t: t[0])
            ok = v <= self.target if self.at_most else v >= self.target
            met = met and ok
            parts.append(f"{dtype}: {self._fmt(v)} (worst: {r['case']}, {r['impl']})")
        if not rows:
            return {"measured": "not measured", "met": None, "rows": 0}
        return {"measured": "; ".join(parts), "met": met, "rows": rows}


def _dw(mode: str, cond: Callable[[str], bool] = lambda case: True) -> Callable[[dict], bool]:
    return lambda r: r.get("op") == "depthwise_conv2d" and f" {mode} " in r["case"] and cond(r["case"])


def _op(op: str, pattern: str = "") -> Callable[[dict], bool]:
    return lambda r: r.get("op") == op and pattern in r["case"]


OURS = ("auto",)
GOALS: list[Goal] = [
    # issue 16: depthwise conv at half the hardware limit
    Goal("#16", "depthwise fwd+bwd, K >= 13: share of the roofline", "depthwise_conv2d", "pct_roofline", 50.0,
         _dw("fwd+bwd", lambda c: kernel_side(c) >= 13), unit="%"),
    Goal("#16", "depthwise fwd, K <= 7: share of the memory bound", "depthwise_conv2d", "pct_roofline", 60.0,
         _dw("fwd", lambda c: kernel_side(c) <= 7), unit="%"),
    Goal("#16", "ParCNetV2 oversized depthwise fwd+bwd vs best PyTorch", "depthwise_conv2d", "x_best_torch", 5.0,
         _dw("fwd+bwd", lambda c: c.startswith("parcv2"))),
    Goal("#16", "auto never slower than the best PyTorch option (every depthwise row)", "depthwise_conv2d",
         "x_best_torch", 1.0, lambda r: r.get("op") == "depthwise_conv2d"),
    # README (issue 5): large-kernel depthwise
    Goal("README", "RepLKNet-like (K = 13, 31) fwd+bwd vs best PyTorch", "depthwise_conv2d", "x_best_torch", 2.0,
         _dw("fwd+bwd", lambda c: c.startswith("replknet"))),
    Goal("README", "K <= 7 via auto vs best PyTorch", "depthwise_conv2d", "x_best_torch", 0.95,
         lambda r: r.get("op") == "depthwise_conv2d" and kernel_side(r["case"]) <= 7),
    Goal("README", "small batch (detection b1/b2/b8), K >= 13, vs best PyTorch", "depthwise_conv2d",
         "x_best_torch", 1.0, lambda r: r.get("op") == "depthwise_conv2d" and r["case"].startswith("det")),
    # issue 12: KernelWarehouse at dense-conv speed
    Goal("#12", "kw_assemble forward: share of the memory bound", "kernelwarehouse", "pct_roofline", 70.0,
         _op("kw_assemble"), impls=("cuda", "triton"), unit="%"),
    Goal("#12", "kw_assemble backward: share of the memory bound", "kernelwarehouse", "pct_roofline", 70.0,
         _op("kw_assemble backward"), impls=("cuda", "triton"), unit="%"),
    Goal("#12", "KW layer fwd+bwd (ResNet-50 stages, bf16) vs the dense conv (cuDNN, channels_last)",
         "kernelwarehouse", "x_baseline", 0.8, _op("kw_conv2d fwd+bwd"), dtypes=("bfloat16",)),
    Goal("#12", "KW-ResNet-50 (b=1) inference throughput vs static ResNet-50", "kernelwarehouse", "x_baseline",
         0.8, _op("kw_resnet50", "inference"), dtypes=("bfloat16",)),
    Goal("#12", "KW-ResNet-50 (b=1) training step time vs static ResNet-50", "kernelwarehouse", "time_ratio",
         1.4, _op("kw_resnet50", "train step"), dtypes=("bfloat16",), at_most=True),
    Goal("#12", "KW-MobileNetV2 (b=1) inference throughput vs static MobileNetV2", "kernelwarehouse", "x_baseline",
         0.8, _op("kw_mobilenetv2", "inference"), dtypes=("bfloat16",)),
    Goal("#12", "KW-MobileNetV2 (b=1) training step time vs static MobileNetV2", "kernelwarehouse", "time_ratio",
         1.4, _op("kw_mobilenetv2", "train step"), dtypes=("bfloat16",), at_most=True),
    Goal("#12", "KW-ConvNeXt-T (b=1) inference throughput vs static ConvNeXt-T", "kernelwarehouse", "x_baseline",
         0.8, _op("kw_convnext_tiny", "inference"), dtypes=("bfloat16",)),
    Goal("#12", "KW-ConvNeXt-T (b=1) training step time vs static ConvNeXt-T", "kernelwarehouse", "time_ratio",
         1.4, _op("kw_convnext_tiny", "train step"), dtypes=("bfloat16",), at_most=True),
    # README (issue 6): KernelWarehouse
    Goal("README", "KW layer fwd+bwd vs the reference (public approach)", "kernelwarehouse", "x_best_torch", 2.0,
         _op("kw_conv2d fwd+bwd")),
    Goal("README", "KW-ResNet-50 training step time vs static ResNet-50", "kernelwarehouse", "time_ratio", 1.6,
         _op("kw_resnet50", "train step"), at_most=True),
]
