"""`depthkit export weights`: official / transformers / depthkit layouts, read back before they are kept."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import tiny_model

from depthkit.cli import main
from depthkit.export import weights as weights_module
from depthkit.export.weights import export_weights, official_constructor
from depthkit.models import create_model
from depthkit.models.registry import model_config

OUTS = {"official": "student.pth", "hf": "student_hf", "depthkit": "student.safetensors"}


def _training_checkpoint(model, path, overrides):
    """The layout `depthkit fit` writes (Lightning): hyper_parameters + state_dict `model.*`."""
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.name, "model_overrides": overrides},
    }
    torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", list(OUTS))
def test_a_training_checkpoint_exports_to_each_layout_and_loads_back_identical(layout, tmp_path, capsys):
    model = tiny_model("test_dav2_metric")
    with torch.no_grad():  # every tensor distinct from a fresh init, so a key that loads the wrong tensor shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    ckpt = _training_checkpoint(model, tmp_path / "last.ckpt", {"max_depth": 80.0})
    out = tmp_path / OUTS[layout]
    assert main(["export", "weights", "--checkpoint", str(ckpt), "--layout", layout, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({layout} layout, test_dav2_metric" in printed and "read back: identical" in printed
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    loaded = create_model("test_dav2_metric", checkpoint_path=out, max_depth=80.0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if layout == "official":
        keys = torch.load(out, map_location="cpu", weights_only=True).keys()
        assert {k.split(".")[0] for k in keys} == {"pretrained", "depth_head"}
        assert "no official constructor builds test_dav2_metric" in printed
    elif layout == "hf":
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        config = json.loads((out / "config.json").read_text())
        assert config["depth_estimation_type"] == "metric" and config["max_depth"] == 80.0
        assert "DepthAnythingForDepthEstimation.from_pretrained" in printed
    else:
        assert "create_model('test_dav2_metric', checkpoint_path=" in printed


def test_official_constructor_names_the_released_architectures():
    assert official_constructor(model_config("dav2_vitl")) == (
        "DepthAnythingV2(encoder='vitl', features=256, out_channels=[256, 512, 1024, 1024])  # depth_anything_v2/dpt.py"
    )
    metric = official_constructor(model_config("dav2_metric_outdoor_vits"))
    assert metric.startswith(  # metric_depth/depth_anything_v2/dpt.py
        "DepthAnythingV2(encoder='vits', features=64, out_channels=[48, 96, 192, 384], max_depth=80)"
    )
    assert official_constructor(model_config("dav1_vitb")).startswith(
        "DepthAnything({'encoder': 'vitb', 'features': 128, 'out_channels': [96, 192, 384, 768]})"
    )
    assert official_constructor(model_config("dav2_vits", drop_path_rate=0.1)).startswith("DepthAnythingV2(")
    assert official_constructor(model_config("test_dav2")) is None
    assert official_constructor(model_config("dav2_vits", tap_indices=(1, 5, 8, 11))) is None


def test_bad_output_or_a_mismatch_writes_nothing(tmp_path, monkeypatch, capsys):
    model = tiny_model("test_dav2")
    ckpt = _training_checkpoint(model, tmp_path / "last.ckpt", {})
    cases = [
        (["--layout", "official", "--out", str(tmp_path / "x.safetensors")], "official layout writes a .pth or .pt"),
        (["--layout", "depthkit", "--out", str(tmp_path / "x.bin")], "depthkit layout writes a .safetensors"),
        (["--layout", "hf", "--out", str(ckpt)], "hf layout writes a folder"),
    ]
    for args, message in cases:
        assert main(["export", "weights", "--checkpoint", str(ckpt), *args]) == 1
        assert message in capsys.readouterr().err
    missing = ["export", "weights", "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "a.pth")]
    assert main(missing) == 1
    assert "checkpoint not found" in capsys.readouterr().err

    real_load = weights_module.load_checkpoint

    def corrupt(net, path):  # a layout bug: one tensor comes back changed
        net = real_load(net, path)
        with torch.no_grad():
            next(net.parameters()).add_(1.0)
        return net

    monkeypatch.setattr(weights_module, "load_checkpoint", corrupt)
    for layout, name in OUTS.items():
        with pytest.raises(ValueError, match=f"{layout} weights did not read back identical: encoder"):
            export_weights(model, tmp_path / name, layout=layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_lossy_export_warns_naming_the_file_written(tmp_path):
    """The warning named the temporary file the export verifies before renaming it into place."""
    import warnings

    out = tmp_path / "metric80.pth"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_weights(create_model("test_dav2_metric", max_depth=80.0), out, layout="depthkit")
    (message,) = [str(w.message) for w in caught if "keeps the weights only" in str(w.message)]
    assert message.startswith(f"{out} keeps the weights only") and out.is_file()
