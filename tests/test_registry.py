"""repkernels.models: list_models / create_model and the timm registration (issue #14); py.typed."""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import repkernels.models as models
from repkernels.models import registry

NAMES = ["kw_convnext_tiny", "kw_mobilenetv2", "kw_resnet18", "kw_resnet50", "parcnetv2_tiny", "parcnetv2_xt"]
SMALL_PARC = {"depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16), "img_size": 32}


def test_list_models():
    assert models.list_models() == NAMES
    assert models.list_models("kw_*") == NAMES[:4]
    assert models.list_models("parcnetv2_*") == NAMES[4:]
    assert models.list_models("nothing*") == []
    assert set(models.available_models()) == set(NAMES) and all(models.available_models().values())
    with pytest.raises(TypeError, match="`pattern`"):
        models.list_models(3)


def test_every_registered_builder_resolves():
    for name in NAMES:
        assert callable(registry._MODELS[name].resolve()), name


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model `name` 'kw_resnet5' \(did you mean 'kw_resnet50'\?\); "
                                         r"choices: kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50, "
                                         r"parcnetv2_tiny, parcnetv2_xt"):
        models.create_model("kw_resnet5")
    with pytest.raises(ValueError, match="unknown model `name` 'resnet50'.*timm.create_model"):
        models.create_model("resnet50")
    with pytest.raises(TypeError, match="`name` must be a model name.*choices: kw_convnext_tiny"):
        models.create_model(None)


def test_create_parcnetv2():
    net = models.create_model("parcnetv2_xt", num_classes=3, **SMALL_PARC)
    assert isinstance(net, models.ParCNetV2) and net.img_size == (32, 32)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="no pretrained weights are published for 'parcnetv2_tiny'"):
        models.create_model("parcnetv2_tiny", pretrained=True)


def test_create_kw_model_matches_its_builder():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    a = models.create_model("kw_resnet18", b=0.5, num_classes=10)
    torch.manual_seed(0)
    b = models.kw_resnet18(b=0.5, num_classes=10)
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    with pytest.raises(ValueError, match="weights='IMAGENET1K_V1'"):
        models.create_model("kw_resnet18", pretrained=True)


def test_register_model_checks():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("kw_resnet18", lambda: None)
    with pytest.raises(TypeError, match="`builder`"):
        models.register_model("x_model", "no colon")


# ----------------------------------------------------------------------------------------------------- timm
timm_required = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")


@timm_required
def test_registered_with_timm_on_import():
    import timm

    assert timm.list_models("kw_*") == NAMES[:4]
    assert timm.list_models("parcnetv2_*") == NAMES[4:]
    assert all(timm.is_model(n) for n in NAMES)
    cfg = timm.models.get_pretrained_cfg("kw_resnet50")
    assert cfg.input_size == (3, 224, 224) and not cfg.has_weights


@timm_required
def test_timm_create_model_kw_resnet50():
    pytest.importorskip("torchvision")
    import timm

    net = timm.create_model("kw_resnet50", b=1)
    assert hasattr(net, "warehouse_manager")
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in models.kw_resnet50(b=1).parameters())
    assert net.pretrained_cfg["num_classes"] == 1000
    # timm's common arguments: mapped where the network has them, refused where it has not
    mbv2 = timm.create_model("kw_mobilenetv2", drop_rate=0.3, num_classes=10)
    assert mbv2.classifier[0].p == 0.3 and mbv2.classifier[1].out_features == 10
    with pytest.raises(ValueError, match=r"`in_chans`=1 is not supported by this network \(only 3\)"):
        timm.create_model("kw_resnet18", in_chans=1)
    with pytest.raises(ValueError, match=r"`drop_rate`=0.2 is not supported"):
        timm.create_model("kw_resnet18", drop_rate=0.2)
    timm.create_model("kw_resnet18", drop_rate=0.0, in_chans=3)       # timm's train.py passes these
    with pytest.raises(ValueError, match="no pretrained weights are published for 'kw_resnet50'"):
        timm.create_model("kw_resnet50", pretrained=True)


@timm_required
def test_timm_create_model_parcnetv2():
    import timm

    net = timm.create_model("parcnetv2_tiny", num_classes=5, in_chans=1, drop_rate=0.25, drop_path_rate=0.1,
                            **SMALL_PARC)
    assert net.head.out_features == 5 and net.head_drop.p == 0.25
    assert net.pretrained_cfg["input_size"] == (1, 32, 32) and net.pretrained_cfg["num_classes"] == 5
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    data = timm.data.resolve_data_config(model=net)
    assert data["input_size"] == (1, 32, 32)


@timm_required
def test_register_timm_is_idempotent_and_does_not_replace_timm_models(monkeypatch):
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.register_timm() == []           # already registered on import: nothing to do, no warning
    monkeypatch.setitem(registry._MODELS, "resnet18", registry.ModelEntry("resnet18", lambda **kw: None))
    with pytest.warns(RuntimeWarning, match="timm already has a model named 'resnet18'"):
        assert models.register_timm(["resnet18"]) == []
    assert timm.models.model_entrypoint("resnet18").__module__ == "timm.models.resnet"
    with pytest.raises(ValueError, match="unknown model `name` 'nope'"):
        models.register_timm(["nope"])


_FRESH = {
    "models first": "import repkernels.models, sys; assert 'timm' not in sys.modules, 'imported timm'; "
                    "import importlib.util; assert importlib.util.find_spec('timm'); import timm",
    "timm first": "import timm, repkernels.models",
}


@timm_required
@pytest.mark.parametrize("order", list(_FRESH))
def test_timm_registration_in_a_fresh_interpreter(order):
    """Registered once both are imported, in either order; importing repkernels.models alone does not import timm
    (seconds), and a find_spec probe before timm's import does not lose the registration."""
    code = (_FRESH[order] + "; m = timm.create_model('parcnetv2_xt', depths=(1, 1, 1, 1), img_size=32, "
            "num_classes=2); print(type(m).__name__, timm.list_models('kw_resnet*'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ParCNetV2 ['kw_resnet18', 'kw_resnet50']"


# ------------------------------------------------------------------------------------------------- py.typed
def test_py_typed_is_shipped():
    assert importlib.resources.files("repkernels").joinpath("py.typed").is_file()
    setup = Path(__file__).resolve().parent.parent / "setup.py"
    tree = ast.parse(setup.read_text())
    data = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            for kw in node.keywords if kw.arg == "package_data"]
    assert data, "setup() has no package_data"
    assert "py.typed" in ast.literal_eval(data[0]).get("repkernels", [])
