"""Export with a dynamic batch (issue 12): ONNX (``torch.onnx.export(dynamo=True)`` / ``repkernels.export_onnx``, run
in onnxruntime), ``torch.export`` and ``torch.compile(dynamic=True)`` of the KernelWarehouse models and layers, and the
ONNX translations of the registered ops (graphs that keep ``torch.ops.repkernels.*``). CPU only; small models."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repkernels
from repkernels import _backend, _extension
from repkernels.export import OPSET, custom_domain_ops, export_onnx, onnx_translations
from repkernels.nn import KWConv1d, KWConv2d, KWConv3d, KWLinear, WarehouseManager, set_temperature
from repkernels.reference import kernelwarehouse as ref

_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_MISSING), reason=f"ONNX export tests need {', '.join(_MISSING)} "
                                                       "(requirements-test.txt)")
TRITON_ON_CPU = _backend.HAS_TRITON and _backend.TRITON_INTERPRET
BATCHES = (1, 3, 8)


# ---------------------------------------------------------------------------------------------- helpers
def _calibrate(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of one training forward (exact batch statistics), then eval: the activations of
    a deep KW network keep unit scale at any τ, so that the comparisons below are not made on vanishing outputs."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives its own statistics
    if bns:
        model.train()
        with torch.no_grad():
            model(*inputs)
    for bn in bns:  # a channel that is dead on the batch (ReLU6, variance ~0) would amplify rounding noise ~300x
        bn.running_var.clamp_(min=1e-2)
    return model.eval()


def _inputs(shapes, batch, seed=1):
    g = torch.Generator().manual_seed(seed + batch)
    return tuple(torch.randn(batch, *s, generator=g) for s in shapes)


def _max_error(got, expect) -> tuple[float, float]:
    """(max |got − expect|, max |expect|)."""
    expect = expect.detach().numpy() if isinstance(expect, torch.Tensor) else expect
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == expect.shape, (got.shape, expect.shape)
    return float(np.abs(got - expect).max()), float(np.abs(expect).max())


def _assert_matches(got, expect, what: str, rel: float = 2e-4) -> float:
    err, scale = _max_error(got, expect)
    assert scale > 1e-3, f"{what}: outputs vanish (max |y| = {scale:g}); the comparison would be empty"
    assert err <= rel * max(scale, 1.0), f"{what}: max |error| {err:g} (max |y| {scale:g})"
    return err


def _run_onnx(program, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0], session


def _assert_fp32_close(got, model, model64, xs, what: str, factor: float = 4.0) -> float:
    """``got`` (an fp32 result of ``model`` on ``xs`` from another runtime or graph) is as close to the float64 eager
    result as eager fp32 is, within ``factor`` (deep networks with exact-batch BatchNorm statistics amplify fp32
    rounding; a wrong translation is off by far more). Returns max |got − eager fp32|."""
    with torch.no_grad(), repkernels.backend("auto"):  # eager: the reference on CPU (float64 included)
        expect = model(*xs)
        exact = model64(*(x.double() for x in xs)).float()
    err_eager, scale = _max_error(expect, exact)
    err_got, _ = _max_error(got, exact)
    assert scale > 1e-3, f"{what}: outputs vanish (max |y| = {scale:g}); the comparison would be empty"
    bound = max(factor * err_eager, 1e-5 * scale)
    assert err_got <= bound, (f"{what}: max |error| vs float64 {err_got:g} > {bound:g} (eager fp32: {err_eager:g}, "
                              f"max |y| {scale:g})")
    return _max_error(got, expect)[0]


def _check_onnx_against_eager(model, shapes, what, example_batch=2, **export_kwargs):
    """Export, then compare onnxruntime with eager fp32 at every batch size of BATCHES. The tolerance is the fp32
    rounding noise of eager PyTorch itself, measured once (batch 3) against float64 (the float64 reference is slow
    on CPU: grouped convolutions)."""
    program = export_onnx(model, _inputs(shapes, example_batch, seed=0), **export_kwargs)
    assert not custom_domain_ops(program.model_proto), what
    xs = _inputs(shapes, 3, seed=7)
    with torch.no_grad(), repkernels.backend("auto"):
        noise, _ = _max_error(model(*xs), copy.deepcopy(model).double()(*(x.double() for x in xs)).float())
    errors = []
    session = None
    for batch in BATCHES:
        xs = _inputs(shapes, batch)
        if session is None:
            got, session = _run_onnx(program, xs)
            # the batch is symbolic in the graph's inputs (not one of the traced sizes)
            assert all(not isinstance(i.shape[0], int) for i in session.get_inputs()), session.get_inputs()
        else:
            got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})[0]
        with torch.no_grad(), repkernels.backend("auto"):
            expect = model(*xs)
        err, scale = _max_error(got, expect)
        assert scale > 1e-3, f"{what} batch {batch}: outputs vanish (max |y| = {scale:g})"
        bound = max(8 * noise, 1e-5 * scale)
        assert err <= bound, f"{what} batch {batch}: max |error| {err:g} > {bound:g} (fp32 noise {noise:g})"
        errors.append((err, scale))
    return program, errors


def _repkernels_ops(graph_module) -> set[str]:
    return {str(n.target) for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("repkernels.")}


# ---------------------------------------------------------------------------------------------- translations
@needs_onnx
def test_translation_table_covers_the_registered_forward_ops():
    table = onnx_translations()
    names = {op.name() for op in table}
    for name in ("kw_assemble", "per_sample_conv2d", "depthwise_conv2d"):
        if _extension.HAS_C and hasattr(torch.ops.repkernels, name):
            assert f"repkernels::{name}" in names
    if _backend.HAS_TRITON:
        assert {"repkernels::kw_assemble_triton", "repkernels::per_sample_conv2d_triton",
                "repkernels::kw_conv2d_fused_triton", "repkernels::depthwise_conv2d_triton"} <= names
    assert all(isinstance(op, torch._ops.OpOverload) and "backward" not in op.name() for op in table)
    assert repkernels.onnx_translations is onnx_translations and repkernels.export_onnx is export_onnx


class _DirectOps(nn.Module):
    """The registered ops called directly (what a fast-path trace keeps in the graph): KW assembly + per-sample conv
    (or the fused op), a depth-wise conv; ``kind`` picks the C++ ('c') or Triton ('triton') ops."""

    def __init__(self, kind: str, conv: dict, fused: bool = False):
        super().__init__()
        self.kind, self.fused, self.conv_args = kind, fused, conv
        cin, cout, k, groups = 8, 16, conv["k"], conv["groups"]
        self.kw = KWConv2d(cin, cout, k, groups=groups, bias=True)
        self.dw_weight = nn.Parameter(torch.randn(cout, 1, 3, 3) * 0.3)
        self.dw_bias = nn.Parameter(torch.randn(cout))

    def _op(self, name):
        return getattr(torch.ops.repkernels, name if self.kind == "c" else f"{name}_triton")

    def forward(self, x):
        c, a = self.conv_args, self.kw.mixing_weights(x)
        layout = list(self.kw.weight_shape)
        st, pad, dil = [c["stride"]] * 2, [c["padding"]] * 2, [c["dilation"]] * 2
        if self.fused:
            y = torch.ops.repkernels.kw_conv2d_fused_triton(x, a, self.kw.warehouse, layout, self.kw.bias, st, pad,
                                                            dil)
        else:
            w = self._op("kw_assemble")(a, self.kw.warehouse, layout)
            y = self._op("per_sample_conv2d")(x, w, self.kw.bias, st, pad, dil, c["groups"])
        return self._op("depthwise_conv2d")(F.relu(y), self.dw_weight, self.dw_bias, [1, 1], [1, 1], [1, 1])

    def reference(self, x):
        c, a = self.conv_args, self.kw.mixing_weights(x)
        w = ref.kw_assemble(a, self.kw.warehouse, self.kw.weight_shape)
        y = torch.stack([F.conv2d(x[i:i + 1], w[i], self.kw.bias, c["stride"], c["padding"], c["dilation"],
                                  c["groups"])[0] for i in range(x.shape[0])])
        return F.conv2d(F.relu(y), self.dw_weight, self.dw_bias, 1, 1, 1, groups=y.shape[1])


CONVS = {"3x3": {"k": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1},
         "3x3-s2-d2-g2": {"k": 3, "stride": 2, "padding": 2, "dilation": 2, "groups": 2},
         "1x1-s2": {"k": 1, "stride": 2, "padding": 0, "dilation": 1, "groups": 1}}
KINDS = [pytest.param("c", marks=pytest.mark.skipif(not _extension.HAS_C, reason="repkernels._C not built")),
         pytest.param("triton", marks=pytest.mark.skipif(not _backend.HAS_TRITON, reason="Triton not installed"))]


@needs_onnx
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("kind", KINDS)
def test_registered_ops_export_through_their_translations(kind, conv):
    # Tracing needs only the ops' fake implementations; onnxruntime is compared with the reference in eager.
    torch.manual_seed(0)
    model = _DirectOps(kind, CONVS[conv]).eval()
    set_temperature(model, 0.4)
    x = torch.randn(2, 8, 9, 9)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    suffix = "" if kind == "c" else "_triton"
    assert _repkernels_ops(ep.graph_module) == {f"repkernels.kw_assemble{suffix}.default",
                                                f"repkernels.per_sample_conv2d{suffix}.default",
                                                f"repkernels.depthwise_conv2d{suffix}.default"}
    program = export_onnx(model, x)
    types = {n.op_type for n in program.model_proto.graph.node}
    assert not custom_domain_ops(program.model_proto)
    assert {"MatMul", "Conv"} <= types  # the translations: batched MatMul for the KW ops, Conv(group=C) for dw
    session = None
    for batch in BATCHES:
        xb = torch.randn(batch, 8, 9, 9)
        with torch.no_grad():
            expect = model.reference(xb)
        if session is None:
            got, session = _run_onnx(program, (xb,))
        else:
            got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        _assert_matches(got, expect, f"{kind} {conv} batch {batch}")


@needs_onnx
@pytest.mark.skipif(not _backend.HAS_TRITON, reason="Triton not installed")
def test_fused_kw_op_exports_through_its_translation():
    torch.manual_seed(0)
    model = _DirectOps("triton", CONVS["3x3-s2-d2-g2"] | {"groups": 1}, fused=True).eval()
    set_temperature(model, 0.7)
    x = torch.randn(2, 8, 9, 9)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert "repkernels.kw_conv2d_fused_triton.default" in _repkernels_ops(ep.graph_module)
    program = export_onnx(model, x)
    assert not custom_domain_ops(program.model_proto)
    for batch in BATCHES:
        xb = torch.randn(batch, 8, 9, 9)
        got, _ = _run_onnx(program, (xb,))
        with torch.no_grad():
            _assert_matches(got, model.reference(xb), f"fused batch {batch}")


class _SmallKWNet(nn.Module):
    """KW layers sharing a warehouse: 3x3 / 1x1 / dilated grouped convs (bias or not), BatchNorm, a linear head."""

    def __init__(self):
        super().__init__()
        self.warehouse_manager = wm = WarehouseManager(cell_num_ratio=0.5)
        self.conv1 = wm.reserve(16, 32, 3, stride=2, padding=1, bias=False, warehouse="s1")
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = wm.reserve(32, 32, 1, bias=True, warehouse="s1")
        self.conv3 = wm.reserve(32, 32, 3, padding=2, dilation=2, groups=2, bias=False, warehouse="s1")
        self.head = nn.Linear(32, 5)
        wm.store()

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


@needs_onnx
@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs Triton with TRITON_INTERPRET=1 (set by conftest without a GPU)")
def test_model_traced_on_the_triton_backend_exports():
    """Under an explicitly forced fast backend the graph keeps the fast ops (Triton: the fused KW conv where the
    routing rule picks it, else assembly + per-sample conv); the exported model matches the eager reference."""
    torch.manual_seed(0)
    model = _calibrate(_SmallKWNet(), torch.randn(8, 16, 9, 9))
    set_temperature(model, 0.3)
    x = torch.randn(2, 16, 9, 9)
    with repkernels.backend("triton"):
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        ops = _repkernels_ops(ep.graph_module)
        assert ops and ops <= {"repkernels.kw_conv2d_fused_triton.default", "repkernels.kw_assemble_triton.default",
                               "repkernels.per_sample_conv2d_triton.default"}
        assert "repkernels.per_sample_conv2d_triton.default" in ops  # conv3 (groups = 2) is never fused
        _check_onnx_against_eager(model, [(16, 9, 9)], "triton-traced SmallKWNet")


# ---------------------------------------------------------------------------------------------- KW layers
class _KWLayers(nn.Module):
    """KWConv1d / KWConv2d / KWConv3d / KWLinear (private warehouses), four inputs sharing the batch."""

    def __init__(self):
        super().__init__()
        self.c1 = KWConv1d(4, 8, 3, stride=2, padding="valid", dilation=2)
        self.c1same = KWConv1d(8, 8, 4, padding="same", groups=2, bias=False)
        self.c2 = KWConv2d(4, 8, 3, padding="same", dilation=2)
        self.c3 = KWConv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2)
        self.lin = KWLinear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x1, x2, x3, tokens):
        a = self.c1same(F.relu(self.c1(x1))).mean(-1)
        b = self.c2(x2).mean((2, 3))
        c = self.c3(x3).mean((2, 3, 4))
        d = self.lin(tokens).mean(1)
        return self.head(a + b + c + d)


LAYER_SHAPES = [(4, 11), (4, 6, 7), (4, 3, 5, 5), (5, 6)]


@needs_onnx
def test_kw_layers_export_to_onnx():
    torch.manual_seed(0)
    model = _KWLayers().eval()
    set_temperature(model, 0.6)
    _check_onnx_against_eager(model, LAYER_SHAPES, "KW layers")


def test_kw_layers_torch_export_dynamic_batch():
    torch.manual_seed(0)
    model = _KWLayers().eval()
    set_temperature(model, 0.6)
    args = _inputs(LAYER_SHAPES, 2)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, args, dynamic_shapes=tuple({0: batch} for _ in args))
    assert not _repkernels_ops(ep.graph_module)
    for n in ep.graph.nodes:  # no grouped convolution over the batch: the convs are matmuls
        assert "convolution" not in str(n.target) and "conv1d" not in str(n.target), n.format_node()
    run = ep.module()
    for b in BATCHES:
        xs = _inputs(LAYER_SHAPES, b)
        with torch.no_grad():
            _assert_matches(run(*xs), model(*xs), f"torch.export KW layers batch {b}", rel=1e-5)


# ---------------------------------------------------------------------------------------------- models
def _model(name):
    from repkernels.models import kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50

    # Small configurations (few classes, narrow where the builder allows, 32x32 images); init="layer" gives the
    # torchvision initialization to the cells (the authors' cell init makes the outputs vanish in depth).
    builders = {"kw_resnet18": lambda: kw_resnet18(b=1, num_classes=10, init="layer"),
                "kw_resnet50": lambda: kw_resnet50(b=0.5, num_classes=10, init="layer"),
                "kw_mobilenetv2": lambda: kw_mobilenetv2(b=0.5, num_classes=10, width_mult=0.5, init="layer"),
                "kw_convnext_tiny": lambda: kw_convnext_tiny(b=1, num_classes=10, init="layer")}
    return builders[name]()


MODEL_TAUS = {"kw_resnet18": 0.3, "kw_resnet50": 0.5, "kw_mobilenetv2": 0.0, "kw_convnext_tiny": 0.8}


@needs_onnx
@pytest.mark.parametrize("name", list(MODEL_TAUS))
def test_models_export_to_onnx_with_a_dynamic_batch(name):
    """Every KW model (b < 1 ones included: the non-local basis of ResNet-50, MobileNetV2's KW classifier)."""
    torch.manual_seed(0)
    model = _model(name)
    set_temperature(model, MODEL_TAUS[name])
    _calibrate(model, torch.randn(4, 3, 32, 32))
    _, errors = _check_onnx_against_eager(model, [(3, 32, 32)], name, optimize=False)
    print(f"{name}: (max |onnxruntime - eager|, max |y|) at batch {BATCHES}: {errors}")  # (pytest -s)


def test_model_torch_export_dynamic_batch():
    torch.manual_seed(0)
    model = _model("kw_resnet18")
    set_temperature(model, 0.3)
    _calibrate(model, torch.randn(8, 3, 32, 32))
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    run, model64 = ep.module(), copy.deepcopy(model).double()
    for b in BATCHES:
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            _assert_fp32_close(run(x), model, model64, (x,), f"torch.export kw_resnet18 batch {b}")


# ---------------------------------------------------------------------------------------------- torch.compile
def test_inductor_dynamic_batch_kw_layers_do_not_recompile():
    """torch.compile(dynamic=True) with Inductor on CPU under `auto` of KWConv1d / KWConv2d ('same' padding) /
    KWConv3d / KWLinear: the per-sample convs are traced as matmuls over kernel taps (no ``groups = B``
    convolution: Inductor failed on it), one compilation serves batch sizes 2, 3 and 8 (Dynamo specializes size 1,
    as for any model). The 2-D network with BatchNorm: test_kernelwarehouse.py (forward and backward)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = _KWLayers().eval()
    set_temperature(layers, 0.6)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layers, dynamic=True, backend=counter)
    frames = []
    for b in (2, 3, 8):
        xs = _inputs(LAYER_SHAPES, b)
        with torch.no_grad():
            _assert_matches(compiled(*xs), layers(*xs), f"inductor KW layers batch {b}", rel=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, frames
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- export_onnx's arguments
@needs_onnx
def test_export_onnx_rejects_bad_arguments(tmp_path):
    model = _KWLayers()
    args = _inputs(LAYER_SHAPES, 2)
    with pytest.raises(ValueError, match="`model` is in training mode"):
        export_onnx(model, args)
    model.eval()
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        export_onnx(lambda x: x, args)
    with pytest.raises(TypeError, match="`example` must be a tensor or a non-empty tuple"):
        export_onnx(model, [a for a in args])
    with pytest.raises(ValueError, match="same batch size"):
        export_onnx(model, (*args[:3], torch.randn(3, 5, 6)))
    with pytest.raises(ValueError, match="`opset_version` must be an int >= 18"):
        export_onnx(model, args, opset_version=17)
    with pytest.raises(TypeError, match="`dynamic_shapes` is set by export_onnx"):
        export_onnx(model, args, dynamic_shapes=None)
    assert OPSET == 18


@needs_onnx
def test_export_onnx_saves_and_accepts_a_batch_of_one(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = KWLinear(6, 4).eval()
    set_temperature(model, 0.5)
    path = tmp_path / "kwlinear.onnx"
    export_onnx(model, torch.randn(1, 6), path)  # batch 1 is repeated for tracing: the graph stays dynamic
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"} or not custom_domain_ops(proto)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        x = torch.randn(b, 6)
        with torch.no_grad():
            _assert_matches(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], model(x),
                            f"KWLinear batch {b}")
