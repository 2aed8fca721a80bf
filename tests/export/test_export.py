"""ONNX export: dynamic sizes, verification, metadata, padding of non-multiples, fp16, atomic writes, the command."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from export_helpers import EXPORT_SIZE, VERIFY_SIZES, tiny_model

from depthkit.cli import main
from depthkit.export import TOLERANCES, OnnxDepthModel, VerificationError, export_onnx, load_model
from depthkit.export.exporter import PaddedDepthModel, graph_meta, parse_dynamic, parse_size, traceable_pos_embed
from depthkit.export.metadata import RECORDED_MODEL_FIELDS, GraphMeta, from_props, to_props
from depthkit.models import ModelMeta, create_model


def _torch(model, image_BCHW: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return PaddedDepthModel(model)(torch.from_numpy(image_BCHW)).numpy()


def test_export_verifies_at_several_sizes_and_aspect_ratios(exported):
    report = exported.verification
    assert report.passed and report.precision == "fp32" and report.tolerance == TOLERANCES["fp32"]
    shapes = {case.shape[2:] for case in report.cases}
    assert shapes == set(VERIFY_SIZES)
    assert {case.source.split()[0] for case in report.cases} == {"random", "image"}
    assert all(case.scale > 0.1 for case in report.cases), "the tiny model's output should vary"
    assert report.max_rel < 1e-5  # far inside the tolerance: only float rounding differs
    text = report.format()
    assert "verification passed" in text and "max rel err" in text


def test_graph_is_dynamic_in_batch_height_and_width(exported, model):
    graph = onnx.load(str(exported.path))
    onnx.checker.check_model(graph, full_check=True)
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    output_dims = [d.dim_param or d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert output_dims == ["batch", "height", "width"]  # batch was declared on the output's height axis
    assert graph.graph.output[0].name == model.meta.output_space
    session = OnnxDepthModel(exported.path)
    rng = np.random.default_rng(0)
    for size in [(28, 126), (14, 14), (140, 98), (84, 56)]:  # none of them the export size 56 x 84
        image_BCHW = rng.standard_normal((3, 3, *size)).astype(np.float32)
        got = session(image_BCHW)
        assert got.shape == (3, *size)
        np.testing.assert_allclose(got, _torch(model, image_BCHW), rtol=0, atol=1e-5)


def test_position_embedding_resize_matches_dinov2_at_every_grid():
    encoder = create_model("test_dav2").encoder  # 5 x 5 stored grid
    with torch.no_grad():
        encoder.pos_embed.normal_()
    for grid_hw in [(5, 5), (1, 1), (3, 8), (8, 3), (5, 7), (7, 5), (37, 20), (2, 2)]:
        torch.testing.assert_close(
            traceable_pos_embed(encoder, *grid_hw), encoder.interpolate_pos_embed(*grid_hw), rtol=0, atol=1e-5
        )
    no_offset = create_model("test_dav2", interpolate_offset=0.0).encoder  # the transformers variant
    # DINOv2-reg's resize (antialiased, no offset), and antialiased with the offset: down, up and mixed grids.
    registers = create_model("test_dav2", interpolate_offset=0.0, interpolate_antialias=True, num_register_tokens=4)
    antialiased = create_model("test_dav2", interpolate_antialias=True)
    for other in (registers.encoder, antialiased.encoder):
        with torch.no_grad():
            other.pos_embed.normal_()
    for variant in (no_offset, registers.encoder, antialiased.encoder):
        for grid_hw in [(3, 8), (5, 5), (6, 6), (1, 1), (2, 3), (11, 4), (37, 20)]:
            torch.testing.assert_close(
                traceable_pos_embed(variant, *grid_hw), variant.interpolate_pos_embed(*grid_hw), rtol=0, atol=1e-5
            )
    plain = create_model("test_dav2").encoder
    plain.load_state_dict(antialiased.encoder.state_dict())
    with torch.no_grad():  # the two resizes differ, so the comparisons above tell them apart
        assert not torch.allclose(plain.interpolate_pos_embed(2, 3), antialiased.encoder.interpolate_pos_embed(2, 3))


def test_non_multiple_sizes_are_zero_padded_and_cropped(exported, model):
    session = OnnxDepthModel(exported.path)
    image_BCHW = np.random.default_rng(1).standard_normal((1, 3, 45, 61)).astype(np.float32)
    got = session(image_BCHW)
    assert got.shape == (1, 45, 61)
    padded = F.pad(torch.from_numpy(image_BCHW), (0, 70 - 61, 0, 56 - 45))  # to 56 x 70, zeros = the mean colour
    with torch.no_grad():
        expected = model(padded)[:, :45, :61].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):  # the torch model itself refuses
        model(torch.from_numpy(image_BCHW))
    assert [v % 14 for v in session.network_size(45, 61, input_size=30)] == [0, 0]  # `infer` resizes: no padding


def test_metadata_round_trip(exported, model):
    props = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    meta = from_props(props)
    assert meta == exported.meta == OnnxDepthModel(exported.path).meta
    assert meta.name == "test_dav2" and meta.output_space == model.meta.output_space
    assert (meta.patch_size, meta.mean, meta.std, meta.max_depth) == (14, model.meta.mean, model.meta.std, None)
    assert meta.dynamic_axes == ("batch", "height", "width") and meta.input_size_hw == EXPORT_SIZE
    import depthkit

    assert props["depthkit_version"] == depthkit.__version__
    metric = graph_meta(create_model("test_dav2_metric"), precision="fp16", dynamic=("batch",), size_hw=(70, 70))
    assert from_props(to_props(metric)) == metric and metric.max_depth == 20.0
    with pytest.raises(ValueError, match="not a depthkit ONNX export"):
        from_props({"model_name": "x"})
    with pytest.raises(ValueError, match="format '9'"):
        from_props({**to_props(metric), "depthkit_onnx_format": "9"})


# `metadata_props` of graphs exported before `GraphMeta` extended `ModelMeta` (depthkit 0.1.0, format 1), in file order
FORMAT_1_PROPS = [
    ("depthkit_onnx_format", "1"),
    ("depthkit_version", "0.1.0"),
    ("model_name", "test_dav2_metric"),
    ("output_space", "metric_depth"),
    ("patch_size", "14"),
    ("mean", "[0.485, 0.456, 0.406]"),
    ("std", "[0.229, 0.224, 0.225]"),
    ("max_depth", "20.0"),
    ("precision", "fp16"),
    ("dynamic_axes", '["batch"]'),
    ("input_size_hw", "[70, 70]"),
    ("non_multiple_policy", "pad"),
]


def test_format_1_metadata_still_loads_and_is_written_byte_for_byte():
    meta = from_props(dict(FORMAT_1_PROPS))
    assert list(to_props(meta).items()) == FORMAT_1_PROPS  # same keys, order and encodings
    assert (meta.name, meta.max_depth, meta.precision, meta.input_size_hw) == (
        "test_dav2_metric",
        20.0,
        "fp16",
        (70, 70),
    )
    assert meta.dynamic_axes == ("batch",) and meta.embed_dim is None
    exported = graph_meta(create_model("test_dav2_metric"), precision="fp16", dynamic=("batch",), size_hw=(70, 70))
    expected = dict(FORMAT_1_PROPS, depthkit_version=exported.depthkit_version)  # same order, this version
    assert list(to_props(exported).items()) == list(expected.items())


def test_graph_meta_is_the_model_meta_plus_export_facts():
    model_meta = create_model("test_dav2_metric").meta
    meta = GraphMeta.from_model_meta(model_meta, precision="fp16", input_size_hw=(70, 70))
    assert isinstance(meta, ModelMeta)  # `OnnxDepthModel.meta` reads like `DepthModel.meta`
    assert all(getattr(meta, name) == getattr(model_meta, name) for name in RECORDED_MODEL_FIELDS)
    assert meta.embed_dim is None and meta.dynamic_axes == ("batch", "height", "width")
    # every `ModelMeta` field is recorded in the graph, except the token width (a graph outputs no tokens): a new
    # field has to be added to `to_props` / `from_props` (a new key) or to this list
    assert {f.name for f in dataclasses.fields(ModelMeta)} == {*RECORDED_MODEL_FIELDS, "embed_dim"}


def test_fp16_export_verifies_within_its_tolerance(model, export_dir, photos):
    result = export_onnx(
        model,
        export_dir / "tiny_fp16.onnx",
        size_hw=EXPORT_SIZE,
        fp16=True,
        verify_sizes=VERIFY_SIZES[:1] + VERIFY_SIZES[-1:],
        verify_images=photos[:1],
        log=None,
    )
    report = result.verification
    assert report.passed and report.tolerance == TOLERANCES["fp16"] and result.meta.precision == "fp16"
    assert report.max_rel > 1e-5, "an fp16 graph that matches fp32 to rounding is not running in fp16"
    graph = onnx.load(str(result.path))
    float16 = onnx.TensorProto.FLOAT16
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers feed float32
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert sum(t.data_type == float16 for t in graph.graph.initializer) > len(graph.graph.initializer) // 2


def test_failed_verification_writes_nothing_at_the_path(model, tmp_path, monkeypatch):
    from depthkit.export import verification

    monkeypatch.setitem(verification.TOLERANCES, "fp32", 0.0)
    with pytest.raises(VerificationError, match="kept as .*bad.failed.onnx"):
        export_onnx(model, tmp_path / "bad.onnx", size_hw=EXPORT_SIZE, verify_sizes=[(42, 42)], log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.failed.onnx"]  # no temporary file, no bad.onnx


def test_a_graph_that_does_not_run_is_kept_and_named_in_one_line(model, tmp_path, monkeypatch):
    """A shape the tracer froze makes ONNX Runtime fail at another size: that is what verification is for, and it
    gave ONNX Runtime's traceback and deleted the graph."""
    real = PaddedDepthModel.forward

    def frozen(self, image_BCHW):
        height, width = int(image_BCHW.shape[-2]), int(image_BCHW.shape[-1])  # Python ints: constants in the graph
        return real(self, image_BCHW).reshape(image_BCHW.shape[0], height, width)

    monkeypatch.setattr(PaddedDepthModel, "forward", frozen)
    with pytest.raises(VerificationError, match=r"graph does not run \(.*kept as .*frozen.failed.onnx") as err:
        export_onnx(model, tmp_path / "frozen.onnx", size_hw=EXPORT_SIZE, verify_sizes=[(42, 70)], log=None)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen.failed.onnx"]


def test_a_bad_verification_image_is_named_before_the_export(checkpoint, tmp_path, capsys):
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a whole jpeg")
    out = tmp_path / "x.onnx"
    args = ["export", "onnx", "--model", "test_dav2", "--weights", str(checkpoint), "--out", str(out)]
    assert main([*args, "--verify-images", str(bad)]) == 1
    assert f"verification image {bad}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


def test_training_checkpoint_names_its_model(tmp_path):
    model = tiny_model("test_dav2_metric")
    ckpt = tmp_path / "last.ckpt"  # the layout `depthkit fit` writes (Lightning): hyper_parameters + state_dict
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": "test_dav2_metric", "model_overrides": {"max_depth": 80.0}},
            "epoch": 0,
        },
        ckpt,
    )
    loaded = load_model(checkpoint=ckpt)
    assert loaded.meta.name == "test_dav2_metric" and loaded.meta.max_depth == 80.0 and not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    torch.save(model.state_dict(), tmp_path / "anonymous.pth")  # weights alone: the model must be named
    with pytest.raises(ValueError, match="does not name its model"):
        load_model(checkpoint=tmp_path / "anonymous.pth")
    assert load_model(checkpoint=tmp_path / "anonymous.pth", model="test_dav2_metric").meta.max_depth == 20.0
    with pytest.raises(ValueError, match="holds a test_dav2_metric model .* not test_dav2"):
        load_model(checkpoint=ckpt, model="test_dav2")
    with pytest.raises(ValueError, match="--checkpoint and --weights both"):
        load_model(checkpoint=ckpt, weights=ckpt)
    with pytest.raises(FileNotFoundError):
        load_model(checkpoint=tmp_path / "missing.ckpt")


def test_command_static_graph(checkpoint, export_dir, photos, capsys):
    out = export_dir / "static.onnx"
    args = ["export", "onnx", "--model", "test_dav2", "--weights", str(checkpoint), "--out", str(out)]
    args += ["--dynamic", "none", "--size", "42x56", "--verify-images", str(photos[0]), "--opset", "18"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "verification passed" in printed and "1 x 3 x 42 x 56" in printed and f"wrote {out}" in printed
    session = OnnxDepthModel(out)
    assert session.static_size_hw == (42, 56) and session.meta.dynamic_axes == ()
    output_dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim]
    assert output_dims == [1, 42, 56]
    from depthkit.export.verification import verify_onnx

    assert verify_onnx(load_model(checkpoint=checkpoint, model="test_dav2"), out, sizes=[(42, 56)]).passed  # batch 1
    with pytest.raises(ValueError, match="static height of 42"):
        session(np.zeros((1, 3, 56, 56), np.float32))
    prediction = session.infer(np.zeros((30, 100, 3), np.uint8))  # resized to the static size, and back
    assert prediction.values.shape == (30, 100)


def test_a_graph_with_one_static_side_keeps_it_and_sizes_the_other_by_aspect(checkpoint, export_dir, capsys):
    """`--dynamic height` (docs/export.md: any subset): `infer`, and so `depthkit predict --onnx`, resizes to the
    static width and gives the height the image's aspect ratio, in patch multiples."""
    out = export_dir / "dynamic_height.onnx"
    args = ["export", "onnx", "--model", "test_dav2", "--weights", str(checkpoint), "--out", str(out)]
    assert main([*args, "--dynamic", "height", "--size", "56x56", "--opset", "18"]) == 0
    capsys.readouterr()
    session = OnnxDepthModel(out)
    assert session.static_size_hw is None
    assert session.network_size(300, 100) == (168, 56) and session.network_size(10, 1000) == (14, 56)
    prediction = session.infer(np.full((90, 30, 3), 120, np.uint8))  # a 168 x 56 graph run, and back
    assert prediction.values.shape == (90, 30) and np.isfinite(prediction.values).all()


def test_command_errors_are_clean(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    base = ["export", "onnx", "--model", "test_dav2", "--weights", str(checkpoint), "--no-verify"]
    cases = [
        (["export", "onnx", "--out", out], "give the model as --checkpoint PATH"),
        ([*base, "--out", out, "--dynamic", "batch,depth"], "subset of batch,height,width"),
        ([*base, "--out", out, "--opset", "11"], "opset 11 is not supported"),
        ([*base, "--out", out, "--size", "50x56"], "not a multiple of the patch size 14"),
        (
            [*base, "--out", out, "--size", "56x56", "--dynamic", "batch,width", "--verify-sizes", "56x70,42x42"],
            "verify size 42x42: the graph's height is static (56, the export size 56x56)",
        ),
        ([*base, "--out", str(tmp_path / "x.onx")], "must end in .onnx"),
        (["export", "onnx", "--model", "test_dav2", "--out", out], "has no official weights"),
        (["export", "onnx", "--model", "test_dav2", "--out", out], "--model test_dav2 --checkpoint PATH"),
        (
            ["export", "onnx", "--model", "test_dav2", "--weights", str(tmp_path / "w.pth"), "--out", out],
            "--weights not",
        ),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        assert message in capsys.readouterr().err, args
    assert list(tmp_path.iterdir()) == []


def test_default_verify_sizes_cover_three_aspect_ratios_and_a_non_multiple():
    from depthkit.export.verification import default_verify_sizes

    for size_hw in [(518, 518), (518, 686), (70, 70), (42, 42)]:
        sizes = default_verify_sizes(size_hw, 14, ("batch", "height", "width"))
        assert sizes[0] == size_hw and len(sizes) == 4
        multiples = [(h, w) for h, w in sizes if h % 14 == 0 and w % 14 == 0]
        assert len(multiples) == 3 and len({h / w for h, w in multiples}) == 3  # export size, landscape, portrait
        assert any(h < w for h, w in multiples) and any(h > w for h, w in multiples)
    assert default_verify_sizes((518, 518), 14, ("batch",)) == [(518, 518)]  # a static H, W: its size only


def test_option_parsers():
    assert parse_dynamic("width,batch") == ("batch", "width")
    assert parse_dynamic("none") == parse_dynamic("") == ()
    assert parse_size("518") == (518, 518) and parse_size("392x518") == (392, 518)
    with pytest.raises(ValueError):
        parse_size("0x14")


@pytest.mark.parametrize("opset", [14, 16, 20])
def test_every_supported_opset_exports_and_verifies(model, tmp_path, opset):
    """The ends and the middle of the documented opset range (17, the default, and 18 are tested above)."""
    result = export_onnx(model, tmp_path / f"opset{opset}.onnx", opset=opset, size_hw=EXPORT_SIZE, log=None)
    assert result.verification.passed and result.verification.max_rel < 1e-5
    imports = {i.domain: i.version for i in onnx.load(str(result.path)).opset_import}
    assert imports[""] == opset


def test_a_terminated_export_leaves_no_temporary_file(checkpoint, tmp_path, monkeypatch):
    """SIGTERM (a kill, a scheduler's time limit) ended the command on the spot: the hidden temporary graph stayed.
    It now ends as an exception, whose cleanup runs; the exit status stays a kill's, and the handler is restored."""
    import os
    import signal

    real_export = torch.onnx.export

    def killed_while_writing(*args, **kwargs):
        real_export(*args, **kwargs)  # the temporary file is written
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch.onnx, "export", killed_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    args = ["export", "onnx", "--model", "test_dav2", "--weights", str(checkpoint), "--out", str(tmp_path / "m.onnx")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before
