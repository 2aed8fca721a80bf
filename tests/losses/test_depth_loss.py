"""The composite training loss: config, presets, shipped YAML, terms, and torch vs Triton parity."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from depthkit.losses import PRESETS, DepthLoss, DepthLossConfig, depth_loss_terms, preset
from depthkit.losses import depth_loss as depth_loss_module

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "loss"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_yaml_parses_and_equals_its_preset(path):
    fields = yaml.safe_load(path.read_text())
    # Every field spelled out, so that merging onto another default (jsonargparse) cannot leak values.
    assert set(fields) == {f.name for f in dataclasses.fields(DepthLossConfig)}
    assert DepthLossConfig(**fields) == PRESETS[path.stem]


def test_every_preset_ships_a_yaml():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(PRESETS)


def test_config_is_frozen_keyword_only_and_documented():
    with pytest.raises(TypeError):
        DepthLossConfig("ssi")  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        DepthLossConfig().trim = 0.5
    tree = ast.parse(inspect.getsource(depth_loss_module))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DepthLossConfig"]
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1] if i + 1 < len(body) else None
            is_doc = (
                isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            )
            assert is_doc, f"field {node.target.id} has no docstring"


@pytest.mark.parametrize(
    "bad",
    [
        {"alignment": "mean"},
        {"metric": "huber"},
        {"trim": 1.0},
        {"gradient_weight": -1.0},
        {"num_scales": 0},
        {"impl": "cuda"},
        {"objective": "silog", "gradient_weight": 1.0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DepthLossConfig(**bad)


def test_preset_overrides_and_unknown():
    assert preset("dav2", impl="torch").impl == "torch"
    with pytest.raises(ValueError, match="unknown loss preset"):
        preset("dav3")


def _batch(seed=0, shape=(3, 12, 11)):
    g = torch.Generator().manual_seed(seed)
    target_BHW = torch.rand(shape, generator=g) + 0.5
    pred_BHW = target_BHW + 0.3 * torch.rand(shape, generator=g)
    valid_BHW = torch.rand(shape, generator=g) > 0.2
    valid_BHW[1] = False
    return pred_BHW, target_BHW, valid_BHW


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_terms_add_up(name):
    out = DepthLoss(preset(name, impl="torch"))(*_batch())
    config = PRESETS[name]
    if config.objective == "silog":
        torch.testing.assert_close(out["loss"], out["silog"])
        return
    expected = out["ssi"] + config.gradient_weight * out.get("gradient", 0.0)
    torch.testing.assert_close(out["loss"], expected)
    assert ("gradient" in out) == (config.gradient_weight > 0)


@pytest.mark.parametrize("name", ["midas", "dav1", "dav2", "dav2_pseudo"])
def test_torch_and_triton_agree(triton_device, close, name):
    pred_BHW, target_BHW, valid_BHW = (x.to(triton_device) for x in _batch(seed=1))
    mask_BHW = torch.zeros_like(valid_BHW)
    mask_BHW[:, 2:7, 3:8] = True
    results = {}
    for impl in ("torch", "triton"):
        p_BHW = pred_BHW.clone().requires_grad_()
        out = DepthLoss(preset(name, impl=impl))(p_BHW, target_BHW, valid_BHW, mask_BHW)
        out["loss"].backward()
        results[impl] = (out, p_BHW.grad)
    (out_t, grad_t), (out_r, grad_r) = results["triton"], results["torch"]
    for key in ("loss", "ssi", "gradient", "loss_own", "loss_partner"):
        if key in out_r:
            close(out_t[key], out_r[key], torch.float32, what=key)
    close(grad_t, grad_r, torch.float32, what="grad")


def test_a_few_training_steps_agree_between_torch_and_triton(triton_device):
    """Same seed, same data: losses of impl="torch" and impl="triton" stay together over SGD steps."""
    g = torch.Generator().manual_seed(2)
    image_BCHW = torch.rand(2, 3, 13, 11, generator=g).to(triton_device)
    target_BHW = (image_BCHW.mean(1) * 2 + 0.5).to(triton_device)
    valid_BHW = torch.ones_like(target_BHW, dtype=torch.bool)
    losses = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        model.to(triton_device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        criterion = DepthLoss(preset("dav2", impl=impl))
        losses[impl] = []
        for _ in range(3):
            out = criterion(model(image_BCHW)[:, 0], target_BHW, valid_BHW)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses[impl].append(out["loss"].item())
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-4)
    assert losses["torch"][-1] != losses["torch"][0]


def test_depth_loss_terms_function_matches_module():
    config = preset("midas", impl="torch")
    batch = _batch(seed=3)
    torch.testing.assert_close(DepthLoss(config)(*batch)["loss"], depth_loss_terms(*batch, config=config)["loss"])


def test_a_loss_config_of_the_wrong_type_is_named():
    with pytest.raises(ValueError, match=r"DepthLossConfig: trim='0.1' must be a number"):
        DepthLossConfig(trim="0.1")
    assert DepthLoss("dav2").config == preset("dav2")  # a preset's name
    with pytest.raises(ValueError, match="DepthLoss: expected a DepthLossConfig or a preset name, got dict"):
        DepthLoss({"trim": 0.1})


def test_a_silog_config_with_a_leftover_gradient_term_names_the_value():
    """A loss YAML that leaves fields out keeps the default loss's values: the error must show which one."""
    from depthkit.losses import DepthLossConfig

    with pytest.raises(ValueError, match=r"gradient_weight=2.0.*set every field"):
        DepthLossConfig(objective="silog", gradient_weight=2.0)
