"""Procedural RGB-D scenes with exact depth, for tests and the demo.

Each scene is a room seen by a pinhole camera: a textured ground plane, a back wall, optional side walls and
ceiling, and textured boxes and spheres standing on the ground, with Lambertian shading from one light, seen
through haze. Depth is
ray-cast exactly (z-depth along the optical axis, metres). Everything is vectorized numpy over pixels; one scene
is a deterministic function of `(seed, index)`.

The scenes carry the monocular cues a small network can learn from: perspective texture gradients on the
ground, occlusion of objects, contact of objects with the ground, shading, the horizon of the back wall, and
aerial perspective (haze: colour fades towards the haze colour as exp(-density * depth)). Haze is the cue that
lets a tiny ViT trained from scratch place walls and objects within CPU minutes. Measured on held-out scenes,
about 1200 steps: without haze, ViTs of embed 32 to 64 stop at AbsRel 0.26, the floor's ramp, whatever the
patch size, data size or learning rate; `tiny_dav2` reaches 0.157 with density 0.08-0.16 per metre, and the
default 0.10-0.20 gives `make demo` its margin (teacher 0.155 against a bar of 0.162).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from depthkit.spaces import METRIC_DEPTH

FAR_CAP_M = 20.0  # farthest depth a scene holds; the back wall stands nearer
DEPTH_STEP_M = 0.001  # synthetic depth is quantized to 1 mm, so shards store it exactly as 16-bit PNG


@dataclass(frozen=True, kw_only=True)
class SceneConfig:
    """Ranges the scene sampler draws from.

    Attributes:
        hfov_deg: Horizontal field of view range, degrees.
        camera_height_m: Camera height above the ground.
        pitch_deg: Downward pitch of the camera.
        room_depth_m: Distance to the back wall.
        room_half_width_m: Half width of the room (side walls), when it has them.
        num_objects: Inclusive range of boxes + spheres.
        haze_per_m: Haze density range, 1/m: the share of the surface colour left at depth z is exp(-density * z).
    """

    hfov_deg: tuple[float, float] = (50.0, 80.0)
    camera_height_m: tuple[float, float] = (1.0, 2.0)
    pitch_deg: tuple[float, float] = (4.0, 20.0)
    room_depth_m: tuple[float, float] = (7.0, FAR_CAP_M - 1.0)
    room_half_width_m: tuple[float, float] = (3.0, 7.0)
    num_objects: tuple[int, int] = (3, 9)
    haze_per_m: tuple[float, float] = (0.10, 0.20)


def _rng(seed: int, index: int) -> np.random.Generator:
    # SeedSequence splits larger ints into 32-bit words: [2**32, 0] would be scene 1 of seed 0.
    if not (0 <= seed < 2**32 and 0 <= index < 2**32):
        raise ValueError(f"scene seed {seed} and index {index} must be in [0, 2**32)")
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


# Per-pixel vectors are `3×N` arrays (one row per component), so numpy's loops run along the pixels; on `N×3`
# arrays every broadcast, reduction or argmax over the components loops three values at a time, several times
# slower. Dot products are summed out rather than handed to BLAS, whose threads stall on a busy machine.


def _sum3(a_3N: np.ndarray) -> np.ndarray:
    """The sum over the three rows, added left to right."""
    return a_3N[0] + a_3N[1] + a_3N[2]


def _argmax3(a_3N: np.ndarray) -> np.ndarray:
    """The first row index of each column's maximum, as `argmax(0)` (columns without NaN)."""
    a0, a1, a2 = a_3N
    return np.where((a0 >= a1) & (a0 >= a2), 0, np.where(a1 >= a2, 1, 2))


def _parity(k_N: np.ndarray) -> np.ndarray:
    """`k % 2` for integer-valued floats, exactly (every step is exact), without the slow float `%`."""
    return k_N - 2 * np.floor(0.5 * k_N)


# Primitive ids in the per-pixel hit map, and the normals of the room planes by id.
_GROUND, _BACK, _LEFT, _RIGHT, _CEILING, _FIRST_OBJECT = range(6)
_PLANE_NORMALS_3P = np.array([(0, 1, 0), (0, 0, -1), (1, 0, 0), (-1, 0, 0), (0, -1, 0)], dtype=np.float32).T


def render_scene(seed: int, index: int, height: int, width: int, config: SceneConfig | None = None) -> dict:
    """Render scene `index` of the sequence `seed`.

    Returns:
        A sample dict: `__key__`, `image` (uint8 `H×W×3`), `target` (float32 `H×W` metres, quantized to
        `DEPTH_STEP_M`), `valid` (bool `H×W`), `meta` (output space, intrinsics, source, licence).
    """
    cfg = config or SceneConfig()
    rng = _rng(seed, index)
    u = lambda lo_hi: float(rng.uniform(*lo_hi))  # noqa: E731

    # Camera: pinhole with random field of view, height and downward pitch.
    hfov = np.deg2rad(u(cfg.hfov_deg))
    fx = fy = 0.5 * width / np.tan(0.5 * hfov)
    cx, cy = 0.5 * width + rng.normal(0, 0.02 * width), 0.5 * height + rng.normal(0, 0.02 * height)
    cam_h, pitch = u(cfg.camera_height_m), np.deg2rad(u(cfg.pitch_deg))
    yaw = np.deg2rad(rng.uniform(-15, 15))

    # Ray directions with camera z = 1, so the hit parameter t is the z-depth.
    cp, sp, cyw, syw = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rot_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])  # rotates the view down by `pitch`
    rot_yaw = np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]])
    rot_world_from_cam = rot_yaw @ rot_pitch  # d_world = R d_cam; row vectors map back to the camera with `@ R`
    # d_world = R (x, y, 1), summed out over the separable pixel grid of camera x (columns) and y (rows)
    x_W = (np.arange(width) + 0.5 - cx) / fx
    y_H1 = (-(np.arange(height) + 0.5 - cy) / fy)[:, None]
    d_3HW = np.empty((3, height, width), dtype=np.float32)  # world: x right, y up, z forward
    for d_HW, (r_x, r_y, r_z) in zip(d_3HW, rot_world_from_cam, strict=True):
        d_HW[:] = r_x * x_W + r_y * y_H1 + r_z
    d_3N = d_3HW.reshape(3, -1)
    origin = np.array([rng.uniform(-0.5, 0.5), cam_h, 0.0], dtype=np.float32)

    def take(t_cand_M: np.ndarray, prim: int, normal_3M: np.ndarray, window: tuple[slice, slice]) -> None:
        """Keep the candidate hits of the pixels in `window` (row-major) that are nearer than what is there already."""
        t_old_hw = t_N.reshape(height, width)[window]  # views: the writes below land in the maps
        t_cand_hw = t_cand_M.reshape(t_old_hw.shape)
        closer_hw = (t_cand_hw > 1e-6) & (t_cand_hw < t_old_hw)
        np.copyto(t_old_hw, t_cand_hw, where=closer_hw)
        np.copyto(hit_N.reshape(height, width)[window], prim, where=closer_hw)
        normal_3hw = surface_normal_3N.reshape(3, height, width)[:, window[0], window[1]]
        np.copyto(normal_3hw, normal_3M.reshape(3, *t_old_hw.shape), where=closer_hw)

    def window_of(corners_K3: np.ndarray) -> tuple[slice, slice]:
        """The screen rectangle (rows, columns) that holds the projection of a convex object's corners."""
        cam_K3 = (corners_K3 - origin) @ rot_world_from_cam
        if np.any(cam_K3[:, 2] <= 0.05):
            return slice(None), slice(None)
        px_u = fx * cam_K3[:, 0] / cam_K3[:, 2] + cx
        px_v = cy - fy * cam_K3[:, 1] / cam_K3[:, 2]
        c0, c1 = max(int(px_u.min()) - 1, 0), min(int(px_u.max()) + 2, width)
        r0, r1 = max(int(px_v.min()) - 1, 0), min(int(px_v.max()) + 2, height)
        if c0 >= c1 or r0 >= r1:
            return slice(0, 0), slice(0, 0)
        return slice(r0, r1), slice(c0, c1)

    def rays_in(window: tuple[slice, slice]) -> np.ndarray:
        """The ray directions of the pixels in `window`, `3×M` row-major (a copy of a rectangle, not a gather)."""
        return d_3HW[:, window[0], window[1]].reshape(3, -1)

    with np.errstate(divide="ignore", invalid="ignore"):
        # Room planes (axis, offset, id): t = (offset - origin[axis]) / d[axis]; the nearest positive wins, ties
        # to the earlier plane; a pixel that no plane hits stays at infinity, as ground.
        room_depth = u(cfg.room_depth_m)
        planes = [(1, 0.0, _GROUND), (2, room_depth, _BACK)]
        half_w = u(cfg.room_half_width_m) if rng.random() < 0.7 else None
        if half_w is not None:
            planes += [(0, -half_w, _LEFT), (0, half_w, _RIGHT)]
        if rng.random() < 0.4:
            planes.append((1, cam_h + rng.uniform(0.8, 2.0), _CEILING))
        half_w = 8.0 if half_w is None else half_w
        t_N = np.full(height * width, np.inf, dtype=np.float32)
        hit_N = np.full(height * width, _GROUND)
        for axis, offset, prim in planes:
            t_plane_N = (offset - origin[axis]).astype(np.float32) / d_3N[axis]
            nearer_N = (t_plane_N > 1e-6) & (t_plane_N < t_N)
            np.copyto(t_N, t_plane_N, where=nearer_N)
            np.copyto(hit_N, prim, where=nearer_N)
        surface_normal_3N = np.take(_PLANE_NORMALS_3P, hit_N, axis=1)

        # Objects on the ground: axis-aligned boxes (slab test) and spheres.
        num_objects = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
        for k in range(num_objects):
            prim = _FIRST_OBJECT + k
            z = rng.uniform(1.5, room_depth - 0.5)
            x = rng.uniform(-min(half_w, 0.6 * z) + 0.3, min(half_w, 0.6 * z) - 0.3)
            if rng.random() < 0.6:
                size = rng.uniform([0.3, 0.2, 0.3], [1.5, 2.0, 1.5])
                lo = np.array([x - size[0] / 2, 0.0, z - size[2] / 2])
                hi = lo + size
                corners_K3 = np.array(
                    [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
                )
                window = window_of(corners_K3)
                d_3M = rays_in(window)
                t_lo_3M = (lo - origin)[:, None] / d_3M
                t_hi_3M = (hi - origin)[:, None] / d_3M
                t_near_3M = np.minimum(t_lo_3M, t_hi_3M)
                t_near_M = t_near_3M.max(0)
                t_far_M = np.maximum(t_lo_3M, t_hi_3M).min(0)
                t_box_M = np.where((t_near_M <= t_far_M) & (t_far_M > 0), t_near_M, np.inf)
                axis_M = _argmax3(t_near_3M)
                columns_M = np.arange(len(axis_M))
                box_normal_3M = np.zeros_like(d_3M)
                box_normal_3M[axis_M, columns_M] = -np.sign(d_3M[axis_M, columns_M])
                take(t_box_M, prim, box_normal_3M, window)
            else:
                radius = rng.uniform(0.25, 0.9)
                center = np.array([x, radius, z])
                corners_K3 = center + radius * np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
                window = window_of(corners_K3)
                d_3M = rays_in(window)
                oc = origin - center
                b_M = _sum3(d_3M * oc[:, None])
                a_M = _sum3(d_3M * d_3M)
                disc_M = b_M * b_M - a_M * (oc @ oc - radius * radius)
                t_sph_M = np.where(disc_M >= 0, (-b_M - np.sqrt(np.maximum(disc_M, 0))) / a_M, np.inf)
                sph_normal_3M = (origin[:, None] + t_sph_M * d_3M - center[:, None]) / radius
                take(t_sph_M, prim, np.nan_to_num(sph_normal_3M, posinf=0.0, neginf=0.0), window)

    # Surface appearance: per-primitive colours and pattern parameters, evaluated per pixel in world coordinates.
    num_prims = _FIRST_OBJECT + num_objects
    base_rgb_P3 = rng.uniform(0.15, 0.95, (num_prims, 3)).astype(np.float32)
    alt_rgb_P3 = (base_rgb_P3 * rng.uniform(0.3, 0.8, (num_prims, 1))).astype(np.float32)
    pattern_P = rng.integers(0, 3, num_prims)  # 0 checker, 1 stripes, 2 smooth waves
    period_P = rng.uniform(0.15, 0.8, num_prims).astype(np.float32)
    hit_N = np.where(np.isfinite(t_N), hit_N, _BACK)
    t_N = np.where(np.isfinite(t_N), t_N, FAR_CAP_M)
    point_3N = origin[:, None] + t_N * d_3N
    # Two tangent coordinates of the hit surface, so textures shrink with distance (a perspective cue).
    major_N = _argmax3(np.abs(surface_normal_3N))  # the axis the surface faces
    period_N = period_P[hit_N]
    su_N = np.where(major_N == 0, point_3N[2], point_3N[0]) / period_N
    sv_N = np.where(major_N == 1, point_3N[2], point_3N[1]) / period_N
    checker_N = _parity(np.floor(su_N) + np.floor(sv_N))
    stripes_N = _parity(np.floor(su_N + 0.5 * sv_N))
    waves_N = 0.5 + 0.5 * np.sin(2.0 * su_N) * np.sin(1.3 * sv_N)
    pattern_N = pattern_P[hit_N]
    mix_N = np.where(pattern_N == 0, checker_N, np.where(pattern_N == 1, stripes_N, waves_N))
    albedo_3N = np.take(base_rgb_P3.T, hit_N, axis=1)
    albedo_3N += np.take((alt_rgb_P3 - base_rgb_P3).T, hit_N, axis=1) * mix_N

    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.8, -0.2)], dtype=np.float32)
    light /= np.linalg.norm(light)
    lambert_N = np.clip(_sum3(surface_normal_3N * light[:, None]), 0, 1)
    ambient = np.float32(rng.uniform(0.25, 0.45))
    rgb_3N = albedo_3N * (ambient + (1 - ambient) * lambert_N)
    density = np.float32(u(cfg.haze_per_m))
    haze_rgb_3 = (rng.uniform(0.6, 0.9) + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
    transmission_N = np.exp(-density * t_N)
    rgb_3N = rgb_3N * transmission_N + haze_rgb_3[:, None] * (1 - transmission_N)
    noise_3N = rng.integers(-2, 3, (height * width, 3), dtype=np.int16).T  # sensor noise, +-2 grey levels
    image_3N = np.clip(rgb_3N * 255 + 0.5, 0, 255).astype(np.int16) + noise_3N
    image_HW3 = np.clip(image_3N, 0, 255).astype(np.uint8).T.reshape(height, width, 3)

    # float64 product, as a 16-bit PNG decodes: shards then store these depths exactly
    depth_HW = (np.rint(t_N.astype(np.float64) / DEPTH_STEP_M) * DEPTH_STEP_M).reshape(height, width).astype(np.float32)
    valid_HW = (depth_HW > 0) & (depth_HW <= FAR_CAP_M)
    depth_HW = np.where(valid_HW, depth_HW, np.float32(0))
    meta = {
        "kind": "labeled",
        "source": "depthkit_synthetic",
        "licence": "CC0-1.0",
        "output_space": METRIC_DEPTH,
        "intrinsics": {"fx": float(fx), "fy": float(fy), "cx": float(cx), "cy": float(cy)},
        "synthetic": {"seed": seed, "index": index, "far_cap_m": FAR_CAP_M, "camera_height_m": cam_h},
    }
    return {
        "__key__": f"synth_{seed:06d}_{index:08d}",
        "image": image_HW3,
        "target": depth_HW,
        "valid": valid_HW,
        "meta": meta,
    }
