"""``repkernels.ops.multibranch_conv_bn``: a sum of conv -> BatchNorm branches in training mode, without
keeping any branch output.

A multi-branch block (PBConv, ACB, the conv branches of DBB) computes, for branches ``l = 0..L-1``,

    out = sum_l BN_l(conv(x, W_l))          (BN_l with the batch statistics of its own branch)

where ``W_l`` covers the rectangle ``rect_l = (top, left, height, width)`` of a ``(kh, kw)`` kernel. The
unfused module keeps every ``y_l = conv(x, W_l)`` for its BatchNorm's backward: activation memory grows
with ``L``. This op computes the same function (same outputs, gradients and running statistics) and
saves only ``x`` and per-channel statistics:

Forward. For each branch, ``y_l`` is computed only to reduce its per-channel mean ``mu_l`` and biased
variance ``var_l`` (then freed). With ``a_l = gamma_l / sqrt(var_l + eps_l)`` the output is ONE conv
with the merged kernel ``sum_l a_l * W_l`` (placed at ``rect_l``) plus the bias
``sum_l (beta_l - a_l * mu_l)`` — the deploy algebra with batch statistics.

Backward (exact per-branch BatchNorm backward, with recomputation). With ``g = grad_out``,
``xhat_l = (y_l - mu_l) / sigma_l`` and means over ``(N, H_out, W_out)``::

    dy_l     = a_l * (g - mean(g) - xhat_l * mean(g * xhat_l))
    dgamma_l = sum(g * xhat_l),  dbeta_l = sum(g)
    dx       = sum_l conv_transpose(dy_l, W_l),   dW_l = conv_weight_grad(x, dy_l)

``y_l`` is recomputed one branch at a time; only one branch-sized temporary is alive at any moment.

Costs, in units of the MACs of one full-kernel conv (``R = sum_l area(rect_l) / (kh * kw)``): the
unfused module does ``R`` (forward) + ``2R`` (backward); this op ``R + 1`` (forward: statistics + merged
conv) + ``3R`` (backward: recompute + both gradients). It trades ``R + 1`` extra conv MACs for not
storing ``L`` branch outputs and not running ``L`` BatchNorm passes.

SyncBatchNorm: with ``process_group`` given, the statistics (count, mean, variance) are all-reduced in
the forward, and ``sum(g)`` / ``sum(g * xhat_l)`` in the backward, exactly as ``nn.SyncBatchNorm``
does (``dgamma``/``dbeta`` stay local, as there).

Running statistics are updated in place as ``F.batch_norm`` does: ``running = (1 - m) * running +
m * stat`` with the unbiased variance and the mean including the conv bias; pass the momentum
``nn.BatchNorm2d`` would use this step (for ``momentum=None``: ``1 / num_batches_tracked``).

torch.func transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``...) and forward-mode AD: the memory-saving
``autograd.Function`` cannot run under them, so both functions then compute the same sum with PyTorch ops
(``conv -> F.batch_norm`` per branch; one conv with the merged kernel for :func:`merged_conv2d`), which every
transform supports (the branch outputs are then kept, as in the unfused module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..reparam.geometry import Rect, as_pair, conv2d_sides
from ._registration import functorch_transforms

OP = "multibranch_conv_bn"


class BranchBN(NamedTuple):
    """The BatchNorm after one branch. ``weight``/``bias`` None: not affine; ``running_*`` None: no tracking.

    ``momentum`` is the factor of this step's update (already resolved for ``momentum=None``).
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float


def branch_sides(sides: Sequence[int], kernel_size: tuple[int, int], dilation: tuple[int, int],
                 rect: Sequence[int]) -> tuple[int, int, int, int]:
    """Padding sides of the branch covering ``rect`` (see :func:`repkernels.reparam.branch_padding`)."""
    pt, pb, pl, pr = sides
    (kh, kw), (dh, dw) = kernel_size, dilation
    t, l, h, w = rect
    return (pt - t * dh, pb - (kh - t - h) * dh, pl - l * dw, pr - (kw - l - w) * dw)


def _as_sides(padding, op: str) -> tuple[int, int, int, int]:
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in padding):
            raise TypeError(f"{op}: `padding` sides must be ints, got {padding!r}")
        return tuple(int(v) for v in padding)  # type: ignore[return-value]
    ph, pw = as_pair(padding, "padding", op, 0)
    return (ph, ph, pw, pw)


def _conv_no_copy(input, weight, stride, sides, dilation, groups) -> torch.Tensor:
    """``conv2d_sides`` (no autograd) without padding/cropping a copy of ``input`` when the sides are uneven:
    a conv with symmetric padding ``max(sides)`` per axis, then a view of the rows/columns the uneven padding
    produces (exact when the stride divides the offset; otherwise ``conv2d_sides``)."""
    pt, pb, pl, pr = sides
    if pt == pb and pl == pr and pt >= 0 and pl >= 0:
        return F.conv2d(input, weight, None, stride, (pt, pl), dilation, groups)
    ph, pw = max(pt, pb, 0), max(pl, pr, 0)
    oy, ox = ph - pt, pw - pl
    if oy % stride[0] or ox % stride[1]:
        return conv2d_sides(input, weight, None, stride, sides, dilation, groups)
    kh, kw = weight.shape[2:]
    oh = (input.shape[2] + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (input.shape[3] + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = F.conv2d(input, weight, None, stride, (ph, pw), dilation, groups)
    return y[:, :, oy // stride[0]:oy // stride[0] + oh, ox // stride[1]:ox // stride[1] + ow]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_stats(y: torch.Tensor, process_group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, biased var) of ``y`` (N, C, H, W) in float32 (float64 for float64), over all ranks of
    ``process_group``."""
    var, mean = torch.var_mean(y.to(_acc(y.dtype)), dim=(0, 2, 3), correction=0)
    return _sync_stats(mean, var, y.shape[0] * y.shape[2] * y.shape[3], process_group)


def _sync_stats(mean: torch.Tensor, var: torch.Tensor, count: int, process_group):
    """Merge per-rank (mean, biased var, count) over ``process_group`` (None: local)."""
    if process_group is None:
        return mean, var, count
    import torch.distributed as dist

    # Stable merge: global mean first, then sum of n_r * (var_r + (mean_r - mean)^2).
    buf = torch.cat([mean * count, mean.new_full((1,), float(count))])
    dist.all_reduce(buf, group=process_group)
    total = int(round(buf[-1].item()))
    gmean = buf[:-1] / total
    m2 = count * (var + (mean - gmean) ** 2)
    dist.all_reduce(m2, group=process_group)
    return gmean, m2 / total, total


def _triton_stats(input, weight, stride, sides, dilation, groups, process_group):
    from ..triton_kernels.multibranch_conv_stats import multibranch_conv_stats

    mean, var, count = multibranch_conv_stats(input, weight, stride, sides, dilation, groups)
    return _sync_stats(mean, var, count, process_group)


class _MultiBranchConvBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, input, *params):
        (rects, bns, kernel_size, stride, sides, dilation, groups, process_group, stats_fn) = meta
        L = len(rects)
        weights, conv_biases = params[:L], params[L:2 * L]
        gammas, betas = params[2 * L:3 * L], params[3 * L:4 * L]
        C = weights[0].shape[0]
        acc = _acc(input.dtype)
        merged = weights[0].new_zeros((C, weights[0].shape[1]) + tuple(kernel_size), dtype=acc)
        shift = torch.zeros(C, dtype=acc, device=input.device)
        a_list, mean_list, inv_list, count = [], [], [], None
        for l in range(L):
            rect, bn, w = rects[l], bns[l], weights[l]
            t, le, h, wd = rect
            if bn is None:
                a, mean, inv = None, None, None
                merged[:, :, t:t + h, le:le + wd] += w.to(acc)
                if conv_biases[l] is not None:
                    shift += conv_biases[l].to(acc)
            else:
                bsides = branch_sides(sides, kernel_size, dilation, rect)
                if stats_fn is not None:
                    mean, var, count = stats_fn(input, w, stride, bsides, dilation, groups, process_group)
                else:
                    with torch.no_grad():
                        y = _conv_no_copy(input, w, stride, bsides, dilation, groups)
                        mean, var, count = _channel_stats(y, process_group)
                        del y
                if count <= 1:
                    raise ValueError(f"{OP}: expected more than 1 value per channel when training, got "
                                     f"{count} (input shape {tuple(input.shape)})")
                inv = torch.rsqrt(var + bn.eps)
                a = inv if gammas[l] is None else gammas[l].to(acc) * inv
                merged[:, :, t:t + h, le:le + wd] += a.view(-1, 1, 1, 1) * w.to(acc)
                shift -= a * mean
                if betas[l] is not None:
                    shift += betas[l].to(acc)
                if bn.running_mean is not None:
                    with torch.no_grad():
                        m = bn.momentum
                        bmean = mean if conv_biases[l] is None else mean + conv_biases[l].to(acc)
                        bn.running_mean.mul_(1 - m).add_(bmean.to(bn.running_mean.dtype), alpha=m)
                        unbiased = var * (count / (count - 1))
                        bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
            a_list.append(a)
            mean_list.append(mean)
            inv_list.append(inv)
        out = conv2d_sides(input, merged.to(input.dtype), shift.to(input.dtype), stride, sides, dilation, groups)
        ctx.meta = meta
        ctx.stats = (a_list, mean_list, inv_list)
        ctx.has = ([b is not None for b in conv_biases], [g is not None for g in gammas],
                   [b is not None for b in betas])
        ctx.beta_dtypes = [None if b is None else b.dtype for b in betas]
        ctx.save_for_backward(input, *weights, *[g for g in gammas if g is not None])
        return out

    @staticmethod
    @once_differentiable   # the backward differentiates detached recomputations
    def backward(ctx, grad_out):
        (rects, bns, kernel_size, stride, sides, dilation, groups, process_group, _) = ctx.meta
        a_list, mean_list, inv_list = ctx.stats
        has_cb, has_g, has_b = ctx.has
        saved = ctx.saved_tensors
        L = len(rects)
        input, weights = saved[0], saved[1:1 + L]
        g_iter = iter(saved[1 + L:])
        gammas = [next(g_iter) if h else None for h in has_g]
        need_x = ctx.needs_input_grad[1]
        acc = _acc(grad_out.dtype)
        sum_g_local = grad_out.sum(dim=(0, 2, 3), dtype=acc)
        sum_g = sum_g_local
        if process_group is not None:
            import torch.distributed as dist
            sum_g = sum_g_local.clone()
            dist.all_reduce(sum_g, group=process_group)
        grad_x = None
        grad_w, grad_cb, grad_gamma, grad_beta = [None] * L, [None] * L, [None] * L, [None] * L
        for l in range(L):
            w, bn = weights[l], bns[l]
            bsides = branch_sides(sides, kernel_size, dilation, rects[l])
            need_w = ctx.needs_input_grad[2 + l]
            with torch.enable_grad():
                xd = input.detach().requires_grad_(need_x)
                wd = w.detach().requires_grad_(need_w)
                y = conv2d_sides(xd, wd, None, stride, bsides, dilation, groups)
            count_local = y.shape[0] * y.shape[2] * y.shape[3]
            if bn is None:
                dy = grad_out
                if has_cb[l]:
                    grad_cb[l] = sum_g_local.to(grad_out.dtype)
            else:
                if _use_cuda_bn_backward(y):
                    dy, sum_gx_local = _bn_backward_cuda(grad_out, y.detach(), mean_list[l], inv_list[l], gammas[l],
                                                         sum_g_local, count_local, process_group)
                else:
                    dy, sum_gx_local = _bn_backward_generic(grad_out, y.detach(), mean_list[l], inv_list[l],
                                                            a_list[l], sum_g, count_local, process_group)
                if has_g[l] and ctx.needs_input_grad[2 + 2 * L + l]:
                    grad_gamma[l] = sum_gx_local.to(gammas[l].dtype)
                if has_b[l] and ctx.needs_input_grad[2 + 3 * L + l]:
                    grad_beta[l] = sum_g_local.to(ctx.beta_dtypes[l])
                if has_cb[l]:
                    # d out / d conv_bias is exactly zero through a training-mode BatchNorm.
                    grad_cb[l] = torch.zeros_like(sum_g_local, dtype=grad_out.dtype)
            targets = [t for t, n in ((xd, need_x), (wd, need_w)) if n]
            if targets:
                grads = torch.autograd.grad(y, targets, dy)
                gi = iter(grads)
                if need_x:
                    gx = next(gi)
                    grad_x = gx if grad_x is None else grad_x + gx
                if need_w:
                    grad_w[l] = next(gi)
            del y, dy
        return (None, grad_x, *grad_w, *grad_cb, *grad_gamma, *grad_beta)


def _use_cuda_bn_backward(y: torch.Tensor) -> bool:
    """PyTorch's fused BatchNorm-backward CUDA kernels (no fake impls: not while torch.compile traces)."""
    return y.is_cuda and not torch.compiler.is_compiling()


def _bn_backward_generic(grad_out, y, mean, inv, a, sum_g, count_local, process_group):
    """BatchNorm backward of one branch with plain tensor ops, any device and dtype (fp32 or wider
    arithmetic): ``dy = a * (g - mean(g) - xhat * mean(g * xhat))`` with ``a = gamma * inv`` and ``sum_g`` the
    (already all-reduced) ``sum g``; ``sum g * xhat`` is all-reduced here.

    Returns ``(dy, sum(g * xhat) local)``."""
    acc = _acc(grad_out.dtype)
    # One branch-sized float temporary (t), turned in place from xhat into dy:
    t = (y.to(acc) - mean.view(1, -1, 1, 1)).mul_(inv.view(1, -1, 1, 1))
    sum_gx_local = (grad_out.to(acc) * t).sum(dim=(0, 2, 3))
    sum_gx = sum_gx_local
    total = count_local
    if process_group is not None:
        import torch.distributed as dist
        buf = torch.cat([sum_gx_local, sum_gx_local.new_full((1,), float(count_local))])
        dist.all_reduce(buf, group=process_group)
        sum_gx, total = buf[:-1], int(round(buf[-1].item()))
    t.mul_(-(sum_gx / total).view(1, -1, 1, 1)).add_(grad_out).sub_((sum_g / total).view(1, -1, 1, 1))
    return t.mul_(a.view(1, -1, 1, 1)).to(grad_out.dtype), sum_gx_local


def _bn_backward_cuda(grad_out, y, mean, inv, gamma, sum_g_local, count_local, process_group):
    """BatchNorm backward of one branch with PyTorch's fused CUDA kernels (those of ``nn.SyncBatchNorm``): one
    reduction pass (``sum g``, ``sum g * (y - mean)``) and one elementwise pass, in ``y``'s dtype.

    Returns ``(dy, sum(g * xhat) local)``.
    """
    fmt = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous() \
        else torch.contiguous_format
    g = grad_out.contiguous(memory_format=fmt)
    y = y.contiguous(memory_format=fmt)
    sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(g, y, mean, inv, None, True, False, False)
    sum_gx_local = sum_dy_xmu * inv
    total = count_local
    if process_group is not None:
        import torch.distributed as dist

        buf = torch.cat([sum_dy, sum_dy_xmu, sum_dy.new_full((1,), float(count_local))])
        dist.all_reduce(buf, group=process_group)
        c = sum_dy.shape[0]
        sum_dy, sum_dy_xmu, total = buf[:c], buf[c:2 * c], int(round(buf[-1].item()))
    weight = None if gamma is None else gamma.to(mean.dtype)
    count = torch.tensor([total], dtype=torch.int32, device=y.device)
    dy = torch.batch_norm_backward_elemt(g, y, mean, inv, weight, sum_dy, sum_dy_xmu, count)
    return dy, sum_gx_local


def _select_stats(input: torch.Tensor, backend: str):
    """The function computing a branch's statistics: None = PyTorch conv + ``var_mean`` (reference).

    ``auto`` keeps the PyTorch (cuDNN) conv: the Triton statistics kernel is used when asked for
    (``backend='triton'`` here or :func:`repkernels.backend`), until benchmarks show where it wins.
    """
    from .. import _backend

    reasons = {"triton": lambda: _backend.triton_unavailable_reason(input)}
    if backend == "auto":
        name = _backend.select(OP, reasons, input.is_cuda, prefer=())
    else:
        with _backend.backend(backend):
            name = _backend.select(OP, reasons, input.is_cuda, prefer=())
    return _triton_stats if name == "triton" else None


def _check_channel_vector(t, name: str, what: str, channels: int, input: torch.Tensor, op: str) -> None:
    """``t`` is None or a floating ``(channels,)`` tensor on ``input``'s device; else a clear error naming it."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` ({what}) must be a tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{op}: `{name}` ({what}) must have shape ({channels},), one value per output channel, "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: `{name}` ({what}) must be floating point, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{op}: `{name}` ({what}) is on {t.device} but `input` is on {input.device}")


def _composite_needed(*tensors) -> bool:
    """Whether a torch.func transform or forward-mode AD (with a dual input) is active: the autograd.Functions
    below cannot run there (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if functorch_transforms():
        return True
    import torch.autograd.forward_ad as fwAD

    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _composite_multibranch_conv_bn(input, weights, rects, bn_params, kernel_size, stride, sides, dilation, groups,
                                   conv_biases) -> torch.Tensor:
    """``sum_l BN_l(conv(x, W_l))`` with PyTorch ops (every transform supports them; the branch outputs are kept)."""
    out = None
    for w, rect, bn, cb in zip(weights, rects, bn_params, conv_biases):
        y = conv2d_sides(input, w, cb, stride, branch_sides(sides, kernel_size, dilation, rect), dilation, groups)
        if bn is not None:
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, float(bn.momentum), bn.eps)
        out = y if out is None else out + y
    return out


def multibranch_conv_bn(input: torch.Tensor, weights: Sequence[torch.Tensor], branch_rects: Sequence[Sequence[int]],
                        bn_params: Sequence[BranchBN | None], *, kernel_size, stride=1, padding=0, dilation=1,
                        groups: int = 1, conv_biases: Sequence[torch.Tensor | None] | None = None,
                        process_group=None, backend: str = "auto") -> torch.Tensor:
    """``sum_l BN_l(conv(x, W_l))`` in training mode (batch statistics), storing no branch output.

    Args:
        input: ``(N, C_in, H, W)``.
        weights: per branch ``(C_out, C_in // groups, height_l, width_l)``, same dtype/device as ``input``.
        branch_rects: per branch ``(top, left, height, width)`` inside the ``kernel_size`` kernel.
        bn_params: per branch a :class:`BranchBN` (training-mode BatchNorm, running statistics updated in
            place) or None (no norm: the branch is added as is, with its conv bias).
        kernel_size, stride, dilation, groups: the block's conv geometry.
        padding: the block's zero padding, an int, a pair or four sides ``(top, bottom, left, right)``.
        conv_biases: per branch ``(C_out,)`` or None (only the running mean sees it under a BatchNorm).
        process_group: all-reduce the statistics over this group (SyncBatchNorm semantics); None: local.
        backend: ``'triton'``: branch statistics by the Triton kernel ``multibranch_conv_stats`` (conv with a
            reduction epilogue, the branch output is never written); ``'reference'``: PyTorch conv +
            ``var_mean`` (one branch output alive at a time); ``'auto'``: the global backend
            (:func:`repkernels.backend`), reference unless 'triton' is asked for there.

    Returns ``(N, C_out, H_out, W_out)``, differentiable w.r.t. ``input``, weights, conv biases, gammas, betas.
    """
    op = OP
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"{op}: `input` must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: `input` must be floating point, got {input.dtype}")
    L = len(weights)
    if L == 0:
        raise ValueError(f"{op}: `weights` is empty")
    if len(branch_rects) != L or len(bn_params) != L:
        raise ValueError(f"{op}: `weights`, `branch_rects` and `bn_params` must have the same length, got "
                         f"{L}, {len(branch_rects)}, {len(bn_params)}")
    conv_biases = [None] * L if conv_biases is None else list(conv_biases)
    if len(conv_biases) != L:
        raise ValueError(f"{op}: `conv_biases` must have {L} entries, got {len(conv_biases)}")
    ks = as_pair(kernel_size, "kernel_size", op, 1)
    st = as_pair(stride, "stride", op, 1)
    dil = as_pair(dilation, "dilation", op, 1)
    sides = _as_sides(padding, op)
    if not isinstance(groups, int) or groups < 1 or input.shape[1] % groups:
        raise ValueError(f"{op}: `groups`={groups!r} must be a positive int dividing C_in={input.shape[1]}")
    rects = []
    c_out = weights[0].shape[0] if isinstance(weights[0], torch.Tensor) else None
    for i, (w, r) in enumerate(zip(weights, branch_rects)):
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise ValueError(f"{op}: `weights[{i}]` must be a 4-D tensor")
        if w.dtype != input.dtype or w.device != input.device:
            raise TypeError(f"{op}: `weights[{i}]` is {w.dtype} on {w.device}, `input` {input.dtype} on {input.device}")
        rect = Rect(*r)
        if rect.top < 0 or rect.left < 0 or rect.top + rect.height > ks[0] or rect.left + rect.width > ks[1]:
            raise ValueError(f"{op}: `branch_rects[{i}]` = {tuple(r)} lies outside the {ks[0]}x{ks[1]} kernel")
        if tuple(w.shape[2:]) != rect.size or w.shape[0] != c_out or w.shape[1] * groups != input.shape[1]:
            raise ValueError(f"{op}: `weights[{i}]` has shape {tuple(w.shape)}, expected "
                             f"({c_out}, {input.shape[1] // groups}, {rect.height}, {rect.width})")
        rects.append(rect)
    if c_out % groups:
        raise ValueError(f"{op}: `groups`={groups} must divide C_out={c_out}")
    for i, cb in enumerate(conv_biases):
        _check_channel_vector(cb, f"conv_biases[{i}]", f"the conv bias of branch {i}, rect {tuple(rects[i])}",
                              c_out, input, op)
    for i, bn in enumerate(bn_params):
        if bn is not None and not isinstance(bn, BranchBN):
            raise TypeError(f"{op}: `bn_params[{i}]` must be a BranchBN or None, got {type(bn).__name__}")
        if bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                _check_channel_vector(getattr(bn, name), f"bn_params[{i}].{name}",
                                      f"the BatchNorm of branch {i}, rect {tuple(rects[i])}", c_out, input, op)
        if bn is not None and (bn.running_mean is None) != (bn.running_var is None):
            raise ValueError(f"{op}: `bn_params[{i}]` must give both running_mean and running_var, or neither")
        if bn is not None and not 0.0 <= float(bn.momentum) <= 1.0:
            raise ValueError(f"{op}: `bn_params[{i}].momentum` must be in [0, 1], got {bn.momentum!r}")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"{op}: `backend` must be 'auto', 'triton' or 'reference', got {backend!r}")
    if _composite_needed(input, *weights, *conv_biases,
                         *[t for bn in bn_params if bn is not None for t in (bn.weight, bn.bias)]):
        if process_group is not None:
            raise ValueError(f"{op}: `process_group` (SyncBatchNorm statistics) is not supported under torch.func "
                             "transforms or forward-mode AD")
        return _composite_multibranch_conv_bn(input, weights, rects, bn_params, ks, st, sides, dil, groups,
                                              conv_biases)
    stats_fn = _select_stats(input, backend)
    gammas = [None if bn is None else bn.weight for bn in bn_params]
    betas = [None if bn is None else bn.bias for bn in bn_params]
    meta = (tuple(rects), tuple(bn_params), ks, st, sides, dil, groups, process_group, stats_fn)
    return _MultiBranchConvBN.apply(meta, input, *weights, *conv_biases, *gammas, *betas)


class _MergedConv(torch.autograd.Function):
    """``conv(x, sum_l s_l * W_l placed at rect_l) + sum_l s_l * b_l``, keeping ``x`` and the branch weights
    (not the merged kernel, which the backward rebuilds)."""

    @staticmethod
    def _merge(rects, kernel_size, weights, scales, dtype):
        acc = _acc(dtype)
        merged = weights[0].new_zeros((weights[0].shape[0], weights[0].shape[1]) + tuple(kernel_size), dtype=acc)
        for (t, le, h, wd), w, s in zip(rects, weights, scales):
            w = w.to(acc)
            merged[:, :, t:t + h, le:le + wd] += w if s is None else s.to(acc).view(-1, 1, 1, 1) * w
        return merged.to(dtype)

    @staticmethod
    def forward(ctx, meta, input, *params):
        rects, kernel_size, stride, sides, dilation, groups = meta
        L = len(rects)
        weights, scales, biases = params[:L], params[L:2 * L], params[2 * L:]
        merged = _MergedConv._merge(rects, kernel_size, weights, scales, input.dtype)
        bias = None
        for s, b in zip(scales, biases):
            if b is not None:
                term = b.to(_acc(input.dtype)) * (1 if s is None else s.to(_acc(input.dtype)))
                bias = term if bias is None else bias + term
        out = conv2d_sides(input, merged, None if bias is None else bias.to(input.dtype), stride, sides, dilation,
                           groups)
        ctx.meta = meta
        ctx.has_s = [s is not None for s in scales]
        ctx.has_b = [b is not None for b in biases]
        ctx.save_for_backward(input, *weights, *[s for s in scales if s is not None],
                              *[b for b in biases if b is not None])
        return out

    @staticmethod
    @once_differentiable   # the backward differentiates detached recomputations
    def backward(ctx, grad_out):
        rects, kernel_size, stride, sides, dilation, groups = ctx.meta
        L = len(rects)
        saved = iter(ctx.saved_tensors)
        input = next(saved)
        weights = [next(saved) for _ in range(L)]
        scales = [next(saved) if h else None for h in ctx.has_s]
        biases = [next(saved) if h else None for h in ctx.has_b]
        merged = _MergedConv._merge(rects, kernel_size, weights, scales, input.dtype)
        need_x = ctx.needs_input_grad[1]
        need_w = any(ctx.needs_input_grad[2:2 + 2 * L])
        with torch.enable_grad():
            xd = input.detach().requires_grad_(need_x)
            md = merged.detach().requires_grad_(need_w)
            y = conv2d_sides(xd, md, None, stride, sides, dilation, groups)
        targets = [t for t, n in ((xd, need_x), (md, need_w)) if n]
        grads = iter(torch.autograd.grad(y, targets, grad_out) if targets else ())
        grad_x = next(grads) if need_x else None
        grad_m = next(grads).to(_acc(input.dtype)) if need_w else None
        gsum = grad_out.to(_acc(grad_out.dtype)).sum(dim=(0, 2, 3)) if any(ctx.has_b) else None
        gw, gs, gb = [None] * L, [None] * L, [None] * L
        for l, ((t, le, h, wd), w, s, b) in enumerate(zip(rects, weights, scales, biases)):
            if grad_m is not None:
                part = grad_m[:, :, t:t + h, le:le + wd]
                if ctx.needs_input_grad[2 + l]:
                    gw[l] = (part if s is None else part * s.to(part.dtype).view(-1, 1, 1, 1)).to(w.dtype)
                if s is not None and ctx.needs_input_grad[2 + L + l]:
                    gs[l] = (part * w.to(part.dtype)).sum(dim=(1, 2, 3))
            if b is not None and ctx.needs_input_grad[2 + 2 * L + l]:
                gb[l] = gsum if s is None else gsum * s.to(gsum.dtype)
            if s is not None and b is not None and ctx.needs_input_grad[2 + L + l]:
                extra = gsum * b.to(gsum.dtype)
                gs[l] = extra if gs[l] is None else gs[l] + extra
        gs = [None if g is None else g.to(s.dtype) for g, s in zip(gs, scales)]
        gb = [None if g is None else g.to(b.dtype) for g, b in zip(gb, biases)]
        return (None, grad_x, *gw, *gs, *gb)


def merged_conv2d(input: torch.Tensor, weights: Sequence[torch.Tensor], branch_rects: Sequence[Sequence[int]],
                  scales: Sequence[torch.Tensor | None], biases: Sequence[torch.Tensor | None], *, kernel_size,
                  stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``sum_l s_l * (conv(x, W_l) + b_l)`` with ``W_l`` at ``rect_l`` of the kernel, as ONE conv.

    ``scales[l]`` ``(C_out,)`` or None (1), ``biases[l]`` ``(C_out,)`` or None. The blocks' ``bn_mode='online'``
    and ``norm=None`` training path. Saves ``x`` and the branch weights; the merged kernel is rebuilt in the
    backward. Differentiable w.r.t. everything.
    """
    L = len(weights)
    if not (len(branch_rects) == len(scales) == len(biases) == L) or L == 0:
        raise ValueError("merged_conv2d: `weights`, `branch_rects`, `scales`, `biases` must be non-empty and of "
                         "the same length")
    meta = (tuple(Rect(*r) for r in branch_rects), as_pair(kernel_size, "kernel_size", "merged_conv2d", 1),
            as_pair(stride, "stride", "merged_conv2d", 1), _as_sides(padding, "merged_conv2d"),
            as_pair(dilation, "dilation", "merged_conv2d", 1), groups)
    c_out = weights[0].shape[0]
    for i, (s, b) in enumerate(zip(scales, biases)):
        _check_channel_vector(s, f"scales[{i}]", f"the scale of branch {i}", c_out, input, "merged_conv2d")
        _check_channel_vector(b, f"biases[{i}]", f"the conv bias of branch {i}", c_out, input, "merged_conv2d")
    if _composite_needed(input, *weights, *scales, *biases):
        rects, ks, st, sides, dil, groups = meta
        merged, bias = None, None
        for (t, le, h, wd), w, s, b in zip(rects, weights, scales, biases):
            term = w if s is None else w * s.to(w.dtype).view(-1, 1, 1, 1)
            term = F.pad(term, (le, ks[1] - le - wd, t, ks[0] - t - h))
            merged = term if merged is None else merged + term
            if b is not None:
                b = b if s is None else b * s.to(b.dtype)
                bias = b if bias is None else bias + b
        return conv2d_sides(input, merged.to(input.dtype), None if bias is None else bias.to(input.dtype), st, sides,
                            dil, groups)
    return _MergedConv.apply(meta, input, *weights, *scales, *biases)
