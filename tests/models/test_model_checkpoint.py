"""Official / depthkit / transformers layouts: exact round trips, strict loading, files, the local cache."""

from __future__ import annotations

import json

import pytest
import torch
from official_da_reference import official_shapes_for, random_state_dict

from depthkit.models import create_encoder, create_model, load_checkpoint, save_checkpoint
from depthkit.models import registry as registry_module
from depthkit.models.checkpoint import (
    checkpoint_dir,
    from_hf,
    from_official,
    hf_to_official,
    load_state_dict,
    official_to_hf,
    to_hf,
    to_official,
)

VARIANTS = {
    "v2": ("test_dav2", {}),
    "v1": ("test_dav1", {}),
    "metric": ("test_dav2_metric", {}),
    "swiglu": ("test_dav2", {"ffn": "swiglu"}),
    "registers": ("test_dav2", {"num_register_tokens": 4}),
}


def _random_model(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor distinct, so a swapped key cannot go unnoticed
    return model


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_are_exact(variant):
    name, overrides = VARIANTS[variant]
    model = _random_model(name, **overrides)
    own = model.state_dict()
    official = to_official(own, model.config)
    assert all(k.startswith(("pretrained.", "depth_head.")) for k in official)
    _assert_same(from_official(official), own)
    hf = to_hf(own, model.config)
    assert all(k.startswith(("backbone.", "neck.", "head.")) for k in hf)
    _assert_same(from_hf(hf), own)
    _assert_same(hf_to_official(official_to_hf(official)), official)
    _assert_same(official_to_hf(hf_to_official(hf)), hf)


def test_transformers_key_names():
    """Spot checks against transformers' convert_depth_anything_to_hf.py rename table."""
    model = _random_model("test_dav2", ffn="swiglu")
    official = to_official(model.state_dict(), model.config)
    hf = official_to_hf(official)
    pairs = {
        "depth_head.scratch.refinenet1.out_conv.weight": "neck.fusion_stage.layers.3.projection.weight",
        "depth_head.scratch.refinenet4.resConfUnit1.conv2.bias": (
            "neck.fusion_stage.layers.0.residual_layer1.convolution2.bias"
        ),
        "depth_head.scratch.layer1_rn.weight": "neck.convs.0.weight",
        "depth_head.resize_layers.3.weight": "neck.reassemble_stage.layers.3.resize.weight",
        "depth_head.scratch.output_conv2.2.bias": "head.conv3.bias",
        "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
        "pretrained.blocks.3.ls2.gamma": "backbone.encoder.layer.3.layer_scale2.lambda1",
        "pretrained.blocks.0.mlp.w12.weight": "backbone.encoder.layer.0.mlp.weights_in.weight",
        "pretrained.norm.bias": "backbone.layernorm.bias",
    }
    for official_key, hf_key in pairs.items():
        assert torch.equal(hf[hf_key], official[official_key]), (official_key, hf_key)
    dim = model.meta.embed_dim
    qkv = official["pretrained.blocks.1.attn.qkv.weight"]
    assert torch.equal(hf["backbone.encoder.layer.1.attention.attention.key.weight"], qkv[dim : 2 * dim])


def test_unrepresentable_heads_are_refused_by_the_transformers_layout():
    model = create_model("test_dav2", use_clstoken=True)
    with pytest.raises(ValueError, match="readout_projects"):
        to_hf(model.state_dict(), model.config)


@pytest.mark.parametrize("layout", ["official", "depthkit", "hf"])
def test_strict_loading_names_the_keys(layout):
    model = _random_model("test_dav2")
    convert = {
        "official": lambda sd: to_official(sd, model.config),
        "depthkit": dict,
        "hf": lambda sd: to_hf(sd, model.config),
    }[layout]
    good = convert(model.state_dict())
    victim = sorted(good)[3]

    missing = dict(good)
    del missing[victim]
    with pytest.raises(ValueError, match=f"missing keys: {victim}"):
        load_state_dict(create_model("test_dav2"), missing)

    extra = dict(good)
    extra[victim.rsplit(".", 1)[0] + ".surprise"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: .*\.surprise"):
        load_state_dict(create_model("test_dav2"), extra)

    mis_shaped = dict(good)
    mis_shaped[victim] = torch.zeros(7, 7)
    with pytest.raises(ValueError, match=rf"shape mismatches: {victim} \(7, 7\)"):
        load_state_dict(create_model("test_dav2"), mis_shaped)


def test_official_state_dict_from_the_reference_table_loads():
    model = create_model("test_dav2")
    table = official_shapes_for(model.config)
    official = random_state_dict(table)
    load_state_dict(model, official)
    _assert_same(to_official(model.state_dict(), model.config), official)


def test_files_round_trip(tmp_path):
    model = _random_model("test_dav2_metric")
    own = model.state_dict()
    for layout, path in [
        ("official", tmp_path / "official.pth"),
        ("depthkit", tmp_path / "depthkit.safetensors"),
        ("depthkit", tmp_path / "depthkit.pth"),
        ("hf", tmp_path / "hf_export"),
    ]:
        save_checkpoint(model, path, layout=layout)
        loaded = create_model("test_dav2_metric", checkpoint_path=path)
        _assert_same(loaded.state_dict(), own)
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    _assert_same(official, to_official(own, model.config))
    config = json.loads((tmp_path / "hf_export" / "config.json").read_text())
    assert config["model_type"] == "depth_anything"
    assert config["depth_estimation_type"] == "metric" and config["max_depth"] == 20.0
    assert config["backbone_config"]["out_indices"] == [1, 2, 3, 4]
    assert config["neck_hidden_sizes"] == [8, 16, 24, 32]
    # The safetensors file alone loads too.
    load_checkpoint(create_model("test_dav2_metric"), tmp_path / "hf_export" / "model.safetensors")


def test_transformers_config_mismatch_is_an_error(tmp_path):
    save_checkpoint(_random_model("test_dav2"), tmp_path / "hf", layout="hf")
    with pytest.raises(ValueError, match=r"out_indices=\[1, 2, 3, 4\] \(model test_dav2 needs \[1, 2, 3, 5\]\)"):
        create_model("test_dav2", checkpoint_path=tmp_path / "hf", depth=6, tap_indices=(0, 1, 2, 4))


def test_training_checkpoints_are_unwrapped(tmp_path):
    """metric_depth/train.py saves {"model": DDP state_dict ("module." keys), "optimizer": ..., "epoch": ...}."""
    model = _random_model("test_dav2")
    official = to_official(model.state_dict(), model.config)
    wrapped = {"model": {"module." + k: v for k, v in official.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "latest.pth")
    _assert_same(create_model("test_dav2", checkpoint_path=tmp_path / "latest.pth").state_dict(), model.state_dict())


def test_a_fit_checkpoint_builds_the_model_it_trained(tmp_path):
    """`depthkit fit` checkpoints name their model and overrides; tensors alone cannot tell `max_depth` apart."""
    from depthkit.models import load_model

    model = _random_model("test_dav2_metric", max_depth=80.0)
    ckpt = tmp_path / "last.ckpt"
    hparams = {"model": "test_dav2_metric", "model_overrides": {"max_depth": 80.0}, "loss": {"objective": "silog"}}
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams}, ckpt
    )
    loaded = load_model(checkpoint_path=ckpt)
    assert loaded.meta.max_depth == 80.0 and not loaded.training
    _assert_same(loaded.state_dict(), model.state_dict())
    assert load_model("test_dav2_metric", ckpt).meta.max_depth == 80.0
    with pytest.raises(ValueError, match="holds a test_dav2_metric model .*, not test_dav2$"):
        load_model("test_dav2", ckpt)
    # Built differently, the same tensors would load silently: refused, naming the field.
    with pytest.raises(ValueError, match=r"max_depth: trained 80.0, here 20.0\); load it with .*load_model"):
        create_model("test_dav2_metric", checkpoint_path=ckpt)
    assert create_model("test_dav2_metric", checkpoint_path=ckpt, max_depth=80.0).meta.max_depth == 80.0
    create_model("test_dav2_metric", checkpoint_path=ckpt, max_depth=80.0, drop_path_rate=0.2)  # training-only field
    start = create_model("test_dav2_metric")  # a run that only starts from these weights may differ
    load_checkpoint(start, ckpt, check_config=False)
    _assert_same(start.state_dict(), model.state_dict())
    plain = save_checkpoint(model, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="does not name its model"):
        load_model(checkpoint_path=plain)
    assert load_model("test_dav2_metric", plain).meta.max_depth == 20.0  # plain weights: the registry's config


def test_an_official_file_name_says_which_model_it_is(tmp_path, monkeypatch):
    """Relative and metric (and V1, V2) files of one size have the same tensors: the official name tells them apart."""
    from depthkit.export.weights import export_weights
    from depthkit.models import load_model

    monkeypatch.setitem(registry_module._CHECKPOINT_FILES, "test_dav2", "tiny_relative.pth")
    monkeypatch.setitem(registry_module._CHECKPOINT_FILES, "test_dav2_metric", "tiny_metric.pth")
    relative = _random_model("test_dav2")
    path = save_checkpoint(relative, tmp_path / "tiny_relative.pth")
    loaded = load_model(checkpoint_path=path)  # no --model needed
    assert loaded.meta.name == "test_dav2"
    _assert_same(loaded.state_dict(), relative.state_dict())
    with pytest.raises(ValueError, match="holds a test_dav2 model \\(its official file name\\), not test_dav2_metric"):
        load_model("test_dav2_metric", path)
    with pytest.raises(ValueError, match="is the official test_dav2 weights file, not for the model built here"):
        create_model("test_dav2_metric", checkpoint_path=path)
    renamed = save_checkpoint(relative, tmp_path / "mine.pth")  # renamed, it is plain weights: the name decides
    assert load_model("test_dav2_metric", renamed).meta.name == "test_dav2_metric"
    with pytest.raises(ValueError, match="--out tiny_metric.pth is the official file name of test_dav2_metric"):
        export_weights(relative, tmp_path / "tiny_metric.pth")
    assert not (tmp_path / "tiny_metric.pth").exists()


def test_depthkit_safetensors_name_their_model_in_the_metadata(tmp_path):
    from depthkit.models import load_model

    metric = _random_model("test_dav2_metric", max_depth=80.0)
    path = save_checkpoint(metric, tmp_path / "metric.safetensors", layout="depthkit")
    save_checkpoint(_random_model("test_dav2"), tmp_path, layout="hf")  # another export's config.json beside it
    loaded = load_model(checkpoint_path=path)  # no --model needed, built with its override
    assert loaded.meta.name == "test_dav2_metric" and loaded.meta.max_depth == 80.0  # not the config.json's model
    _assert_same(loaded.state_dict(), metric.state_dict())
    with pytest.raises(ValueError, match="holds a test_dav2_metric model \\(the model its metadata names\\)"):
        load_model("test_dav2", path)  # same tensor shapes: without the metadata it would load silently
    with pytest.raises(ValueError, match="holds test_dav2_metric weights .*max_depth: trained 80.0, here 20.0"):
        create_model("test_dav2_metric", checkpoint_path=path)
    registers = _random_model("test_dav2", num_register_tokens=4)
    path = save_checkpoint(registers, tmp_path / "registers.safetensors", layout="depthkit")
    assert load_model(checkpoint_path=path).config == registers.config


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("test_dav2", checkpoint_path=tmp_path / "nope.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: unrecognized checkpoint layout; first keys: a"):
        create_model("test_dav2", checkpoint_path=tmp_path / "other.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        create_model("test_dav2", checkpoint_path=tmp_path / "list.pth")


def test_sharded_checkpoint_folder_names_the_conversion(tmp_path):
    """FSDP2 with `save_distributed_checkpoint: true` writes a torch.distributed.checkpoint folder: the error gives
    torch's one-file conversion, and the converted file loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model = _random_model("test_dav2")
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=folder)
    with pytest.raises(ValueError, match="sharded .*format_utils dcp_to_torch"):
        create_model("test_dav2", checkpoint_path=folder)
    dcp_to_torch_save(folder, tmp_path / "last.pt")
    _assert_same(create_model("test_dav2", checkpoint_path=tmp_path / "last.pt").state_dict(), model.state_dict())


def test_pretrained_looks_only_in_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHKIT_HOME", str(tmp_path / "home"))
    assert checkpoint_dir() == tmp_path / "home" / "checkpoints"
    expected = tmp_path / "home" / "checkpoints" / "depth_anything_v2_vits.pth"
    with torch.device("meta"), pytest.raises(FileNotFoundError, match=f"looked for {expected}"):
        create_model("dav2_vits", pretrained=True)
    with pytest.raises(FileNotFoundError, match="test_dav2 has no official weights"):
        create_model("test_dav2", pretrained=True)
    # A registered model whose file is in the folder loads from there (a tiny stand-in for the official file).
    monkeypatch.setitem(registry_module._CHECKPOINT_FILES, "test_dav2", "tiny_official.pth")
    model = _random_model("test_dav2")
    save_checkpoint(model, tmp_path / "home" / "checkpoints" / "tiny_official.pth")
    _assert_same(create_model("test_dav2", pretrained=True).state_dict(), model.state_dict())
    # checkpoint_path with pretrained=True is a folder to look in, or the file itself.
    with pytest.raises(FileNotFoundError, match=f"looked for {tmp_path / 'elsewhere' / 'tiny_official.pth'}"):
        create_model("test_dav2", pretrained=True, checkpoint_path=tmp_path / "elsewhere")
    given = tmp_path / "home" / "checkpoints" / "tiny_official.pth"
    _assert_same(create_model("test_dav2", pretrained=True, checkpoint_path=given).state_dict(), model.state_dict())


def test_pretrained_encoder_looks_for_the_dinov2_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHKIT_HOME", str(tmp_path))
    with torch.device("meta"), pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        create_encoder("vits", pretrained=True)
    with torch.device("meta"):
        assert create_encoder("dinov2_vitl14").config.depth == 24
        assert create_encoder("dav2_vitb").config.embed_dim == 768
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("vith")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("test_dav2", {}), ("test_dav1", {}), ("test_dav2_metric", {}), ("test_dav2", {"ffn": "swiglu"})],
)
def test_transformers_loads_the_export(tmp_path, name, overrides):
    """transformers reads the export and writes it back (a dev dependency: depthkit itself never imports it)."""
    import transformers

    model = _random_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
        model.head.scratch.output_conv2[2].bias.fill_(1.0)
    save_checkpoint(model, tmp_path / "hf", layout="hf")
    hf_model, info = transformers.DepthAnythingForDepthEstimation.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info
    image = torch.randn(1, 3, 70, 70)  # the tiny models' pre-training grid: no position-embedding resize
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(pixel_values=image).predicted_depth, model(image))
    hf_model.save_pretrained(tmp_path / "resaved")
    _assert_same(create_model(name, checkpoint_path=tmp_path / "resaved", **overrides).state_dict(), model.state_dict())


def test_a_torch_file_of_a_model_with_overrides_warns_that_it_keeps_weights_only(tmp_path):
    """Loaded by name, the file would give max_depth 20 m to weights trained for 80."""
    model = create_model("test_dav2_metric", max_depth=80.0)
    with pytest.warns(UserWarning, match=r"keeps the weights only, not this model's max_depth=80.0"):
        save_checkpoint(model, tmp_path / "metric.pth")
    save_checkpoint(model, tmp_path / "metric.safetensors")  # records the overrides: nothing to warn of
    with pytest.raises(ValueError, match=r"drop_path_rate=2.0 is not a probability"):
        create_model("test_dav2", drop_path_rate=2.0)


def test_random_weights_are_the_same_model_in_every_command():
    """predict seeded its --random-weights model and eval did not: the same smoke test scored two models."""
    from depthkit.models import load_model

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, second = (load_model("test_dav2", pretrained=False) for _ in range(2))
    _assert_same(first.state_dict(), second.state_dict())
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is left as it was
