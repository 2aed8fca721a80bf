"""Every depth encoding of the real samples decodes to the statistics in ../shared/data/README.md."""

from __future__ import annotations

import os

import numpy as np
import pytest

from depthkit.data.formats import DepthCodec, decode_depth, parse_codec
from depthkit.data.manifest import iter_manifest, load_row, read_manifest

# (key substring, valid fraction range, depth range in metres (min, max) with tolerance, median or None)
EXPECTED = [
    ("NYU_color", (0.91, 0.95), (1.35, 6.75), 3.27),  # raw Kinect PGM, little-endian, 351.3/(1092.5-raw)
    ("SUN_color", (0.80, 0.84), (1.0, 9.95), None),  # bit-rotated uint16 mm
    ("TUM_color", (0.79, 0.83), (1.4, 9.4), None),  # /5000
    ("kitti_demo_rgb_0000000005", (0.17, 0.22), (5.0, 86.0), None),  # /256, sparse LiDAR
    ("kitti_demo_rgb_0000000050", (0.17, 0.22), (5.0, 86.0), None),
    ("kitti_demo_rgb_0000000100", (0.17, 0.22), (5.0, 86.0), None),
    ("nyu_demo_rgb_rgb_00000", (0.66, 0.76), (0.5, 10.0), None),  # mm, registered
    ("nyu_demo_rgb_rgb_00050", (0.66, 0.76), (0.5, 10.0), None),
    ("nyu_demo_rgb_rgb_00100", (0.66, 0.76), (0.5, 10.0), None),
    ("unidepth_demo_rgb", (0.66, 0.70), (0.5, 10.0), None),  # mm, capped at 10 m
    ("motorcycle_left", (0.91, 0.95), (2.1, 5.03), None),  # Middlebury disparity, B*f/(d+doffs)
]


@pytest.fixture(scope="module")
def samples(shared_data):
    return {s["__key__"]: s for s in iter_manifest(shared_data / "rgbd" / "manifest.csv")}


@pytest.mark.parametrize(("fragment", "valid_range", "depth_range", "median"), EXPECTED)
def test_real_encodings_match_readme_statistics(samples, fragment, valid_range, depth_range, median):
    (key,) = [k for k in samples if fragment in k]
    sample = samples[key]
    target, valid = sample["target"], sample["valid"]
    assert sample["meta"]["output_space"] == "metric_depth"
    assert target.dtype == np.float32 and valid.dtype == bool and target.shape == sample["image"].shape[:2]
    assert valid_range[0] <= valid.mean() <= valid_range[1], f"{key}: valid fraction {valid.mean():.3f}"
    lo, hi = target[valid].min(), target[valid].max()
    assert depth_range[0] <= lo and hi <= depth_range[1], f"{key}: depth range {lo:.2f}..{hi:.2f}"
    assert np.all(target[~valid] == 0) and np.all(np.isfinite(target))
    if median is not None:
        assert abs(np.median(target[valid]) - median) < 0.02


def test_sun3d_frames_are_mm_with_about_88_percent_valid(samples):
    sun3d = [s for k, s in samples.items() if k.startswith("sun3d")]
    assert len(sun3d) == 16
    for s in sun3d:
        assert 0.85 <= s["valid"].mean() <= 0.90
        assert 0.8 <= s["target"][s["valid"]].min() and s["target"][s["valid"]].max() <= 7.1


def test_manifest_has_every_real_row(shared_data):
    rows = read_manifest(shared_data / "rgbd" / "manifest.csv")
    assert len(rows) == 27
    assert len({r.key for r in rows}) == 27
    tum = next(r for r in rows if "TUM" in r.key)
    assert tum.intrinsics == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
    assert tum.codec.scale == pytest.approx(0.0002)
    kitti = next(r for r in rows if "kitti" in r.key)
    assert kitti.codec.scale == pytest.approx(1 / 256)


def test_greyscale_and_rgba_images_become_rgb(tmp_path):
    from PIL import Image

    from depthkit.data.formats import load_image

    Image.fromarray(np.full((5, 7), 100, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((5, 7, 4), 50, np.uint8)).save(tmp_path / "rgba.png")
    for name in ("grey.png", "rgba.png"):
        image = load_image(tmp_path / name)
        assert image.shape == (5, 7, 3) and image.dtype == np.uint8


def test_exif_orientation_is_honoured(tmp_path):
    from PIL import Image

    from depthkit.data.formats import load_image

    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = 255  # a marker in the top-left corner
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    image = load_image(tmp_path / "rot.jpg")
    assert image.shape == (6, 4, 3)
    assert image[0, -1].mean() > 128  # the marker went to the top-right corner


def test_float_formats_decode(tmp_path):
    depth = np.array([[1.5, 0.0], [np.nan, 2.25]], np.float32)
    np.save(tmp_path / "d.npy", depth)
    target, valid, space = decode_depth(tmp_path / "d.npy", DepthCodec(depth_format="npy_float32"))
    assert space == "metric_depth"
    np.testing.assert_array_equal(valid, [[True, False], [False, True]])
    np.testing.assert_array_equal(target, [[1.5, 0.0], [0.0, 2.25]])

    import tifffile

    tifffile.imwrite(tmp_path / "d.tif", depth * 1000)
    target, valid, _ = decode_depth(tmp_path / "d.tif", parse_codec("tiff_float32", "0.001", "", where="t"))
    np.testing.assert_allclose(target, [[1.5, 0.0], [0.0, 2.25]], rtol=1e-6)


def test_exr_reads_through_opencv_or_names_the_file(tmp_path):
    """EXR goes through OpenCV's OpenEXR codec. Wheels built without it give an error naming the file."""
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2

    depth = np.array([[1.5, 0.0], [3.0, 2.25]], np.float32)
    path = tmp_path / "d.exr"
    try:
        written = cv2.imwrite(str(path), depth)
    except cv2.error:
        written = False
    codec = parse_codec("exr_float32", "1", "0", where="t")
    if written:
        target, valid, _ = decode_depth(path, codec)
        np.testing.assert_array_equal(target, depth)
        np.testing.assert_array_equal(valid, depth > 0)
    else:
        path.write_bytes(b"v/1\x01 not a real EXR")
        with pytest.raises(ValueError, match=r"d\.exr: OpenCV could not read this EXR"):
            decode_depth(path, codec)


def test_pfm_disparity_with_and_without_calibration(tmp_path):
    disp = np.array([[10.0, 20.0], [np.inf, 40.0]], np.float32)
    with open(tmp_path / "d.pfm", "wb") as f:
        f.write(b"Pf\n2 2\n-1.0\n")
        f.write(np.flipud(disp).astype("<f4").tobytes())
    target, valid, space = decode_depth(tmp_path / "d.pfm", parse_codec("pfm_disparity_px", "", "", where="t"))
    assert space == "disparity"
    np.testing.assert_array_equal(target, [[10, 20], [0, 40]])
    codec = parse_codec("pfm_disparity_px", "depth_mm = 100*10/(disp+0)", "", where="t")
    target, valid, space = decode_depth(tmp_path / "d.pfm", codec)
    assert space == "metric_depth"
    np.testing.assert_allclose(target, [[0.1, 0.05], [0, 0.025]], rtol=1e-6)


def test_uint16_invalid_value_65535(tmp_path):
    from PIL import Image

    Image.fromarray(np.array([[1000, 65535], [0, 2000]], np.uint16)).save(tmp_path / "d.png")
    codec = parse_codec("uint16_png", "0.001", "65535", where="t")
    target, valid, _ = decode_depth(tmp_path / "d.png", codec)
    np.testing.assert_array_equal(valid, [[True, False], [False, True]])
    np.testing.assert_allclose(target, [[1.0, 0.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    ("fmt", "scale", "invalid", "message"),
    [
        ("png_mystery", "0.001", "0", "unknown depth_format 'png_mystery'"),
        ("uint16_png", "metres please", "0", "scale_to_metres 'metres please'"),
        ("uint16_png", "-1", "0", "must be positive"),
        ("uint16_png", "0.001", "zero", "invalid 'zero'"),
        ("npz_float32_disparity_px", "depth = f(disp)", "NaN", "depth_mm = BASELINE*F/(disp+DOFFS)"),
    ],
)
def test_bad_manifest_fields_name_the_problem(fmt, scale, invalid, message):
    with pytest.raises(ValueError, match="manifest.csv:3") as info:
        parse_codec(fmt, scale, invalid, where="manifest.csv:3")
    assert message in str(info.value)


def _write_manifest(tmp_path, rows: list[str]) -> object:
    header = "source,rgb,depth,depth_format,scale_to_metres,invalid,fx,fy,cx,cy,domain,gt_type,notes\n"
    path = tmp_path / "manifest.csv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def test_missing_file_and_size_mismatch_name_row_and_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.ones((5, 6), np.uint16)).save(tmp_path / "a_depth.png")
    path = _write_manifest(
        tmp_path,
        [
            "s,a.png,a_depth.png,uint16_png,0.001,0,,,,,indoor,x,",
            "s,b.png,missing.png,uint16_png,0.001,0,,,,,indoor,x,",
        ],
    )
    rows = read_manifest(path)
    with pytest.raises(ValueError, match=r"manifest.csv:2.*a_depth.png is 6x5 but image .*a.png is 6x4"):
        load_row(rows[0])
    with pytest.raises(FileNotFoundError, match=r"manifest.csv:3.*b.png"):
        load_row(rows[1])
    stats: dict = {}
    assert list(iter_manifest(path, on_error="skip", stats=stats)) == []
    assert stats["skipped"] == 2 and len(stats["errors"]) == 2


def test_manifest_missing_column_and_duplicate_key(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("source,rgb,depth\nx,a.png,b.png\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_manifest(path)
    path = _write_manifest(
        tmp_path, ["s,a.png,d.png,uint16_png,0.001,0,,,,,i,x,", "s,a.png,e.png,uint16_png,1,0,,,,,i,x,"]
    )
    with pytest.raises(ValueError, match="repeats line 2"):
        read_manifest(path)


def test_pgm_header_without_samples_is_an_error(tmp_path):
    (tmp_path / "d.pgm").write_bytes(b"P5 4 4 65535\n" + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        decode_depth(tmp_path / "d.pgm", DepthCodec(depth_format="nyu_raw_kinect_disparity_pgm"))


def test_an_rgbd_pair_whose_image_asks_for_an_exif_rotation_is_refused(tmp_path):
    """Applied to the image alone, a 180-degree tag would misalign it with its depth map without a word."""
    from PIL import Image

    img = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 3  # rotate 180 degrees on display: same size, so no size check would catch it
    img.save(tmp_path / "a.jpg", exif=exif)
    Image.fromarray(np.ones((4, 6), np.uint16)).save(tmp_path / "a_depth.png")
    path = _write_manifest(tmp_path, ["s,a.jpg,a_depth.png,uint16_png,0.001,0,,,,,indoor,x,"])
    with pytest.raises(ValueError, match=r"manifest.csv:2: .*a.jpg: its EXIF orientation \(3\) rotates or flips"):
        load_row(read_manifest(path)[0])


def test_manifest_slips_are_named_with_their_cause(tmp_path):
    from depthkit.data.formats import parse_codec

    with pytest.raises(ValueError, match="must read 'depth_mm = BASELINE"):  # the trailing '/ 1000' was dropped
        parse_codec("npz_float32_disparity_px", "depth_mm = 193.001*994.978/(disp+31.086) / 1000", "", where="m:2")
    commented = parse_codec("npz_float32_disparity_px", "depth_mm = 2*3/(disp+1) (calibration)", "", where="m:2")
    assert commented.disparity_to_depth == (6.0, 1.0)
    path = _write_manifest(tmp_path, ["s,.,d.png,uint16_png,0.001,0,,,,,indoor,x,"])
    with pytest.raises(ValueError, match="manifest.csv:2: cannot make a sample key"):
        read_manifest(path)
    header = "source, rgb, depth, depth_format, scale_to_metres, invalid, fx, fy, cx, cy, domain, gt_type, notes\n"
    path.write_text(header)
    with pytest.raises(ValueError, match="lacks column.* \\(its header has spaces around the column names"):
        read_manifest(path)
    path.write_text(header.replace(", ", ";"))
    with pytest.raises(ValueError, match="lacks column.* \\(it is not comma-separated"):
        read_manifest(path)


def test_a_sky_mask_of_another_size_or_unreadable_names_the_row(tmp_path):
    from PIL import Image

    from depthkit.data.formats import load_mask

    for name in ("a.png", "a2.png"):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / name)
    Image.fromarray(np.ones((4, 6), np.uint16)).save(tmp_path / "a_depth.png")
    Image.fromarray(np.ones((5, 6), np.uint8)).save(tmp_path / "small_sky.png")
    (tmp_path / "broken_sky.png").write_bytes(b"not a png")
    header = "source,rgb,depth,depth_format,scale_to_metres,invalid,fx,fy,cx,cy,domain,gt_type,notes,sky\n"
    (tmp_path / "m.csv").write_text(
        header + "s,a.png,a_depth.png,uint16_png,0.001,0,,,,,i,x,,small_sky.png\n"
        "s,a2.png,a_depth.png,uint16_png,0.001,0,,,,,i,x,,broken_sky.png\n"
    )  # fmt: skip
    rows = read_manifest(tmp_path / "m.csv")
    with pytest.raises(ValueError, match=r"m.csv:2: sky mask .*small_sky.png is 6x5 but image .*a.png is 6x4"):
        load_row(rows[0])
    with pytest.raises(ValueError, match=r"m.csv:3: cannot decode mask .*broken_sky.png"):
        load_row(rows[1])
    # Any non-zero pixel is sky: 0/1 label maps, palette masks, RGB by any channel; alpha is ignored.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3], rgba[0, 0, 2] = 255, 1
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert load_mask(tmp_path / "rgba.png").tolist() == [[True, False], [False, False]]
    Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").save(tmp_path / "l.png")
    assert load_mask(tmp_path / "l.png").tolist() == [[False, True]]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(ValueError, match=r"m.jpg is a JPEG \(lossy: its edges grow\); save masks as PNG"):
        load_mask(tmp_path / "m.jpg")


def test_a_sky_mask_on_an_affine_target_is_refused_when_read():
    """Sky trains at disparity 0, the farthest only in depth or disparity: a shard from another tool that sets a sky
    mask on an affine target is refused, as the writer refuses to write one."""
    import json

    from depthkit.data.shards import ShardFormatError, decode_sample, encode_sample

    sample = {"__key__": "k", "image": np.zeros((2, 3, 3), np.uint8), "target": np.ones((2, 3), np.float32)}
    sample |= {"sky": np.ones((2, 3), bool), "meta": {"output_space": "disparity"}}
    raw = {k.split(".", 1)[1]: v for k, v in encode_sample(sample).items()}
    assert decode_sample({"__key__": "k", **raw})["sky"].all()
    raw["json"] = json.dumps({**json.loads(raw["json"]), "output_space": "affine_disparity"}).encode()
    with pytest.raises(ShardFormatError, match="a sky mask needs a depth or disparity target"):
        decode_sample({"__key__": "k", **raw})


def test_every_depth_format_has_a_reader_and_a_container():
    """A format added to one table and not the other crashed `data convert` with a bare KeyError."""
    from depthkit.data import formats

    assert set(formats._CONTAINER) == set(formats._READERS)  # DEPTH_FORMATS is _READERS' keys
    assert set(formats.DISPARITY_FORMATS) <= set(formats.DEPTH_FORMATS)
