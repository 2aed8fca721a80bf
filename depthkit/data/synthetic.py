"""Procedural RGB-D scenes with exact depth, for tests and the demo.

Each scene is a room seen by a pinhole camera: a textured ground plane, a back wall, optional side walls and
ceiling, and textured boxes and spheres standing on the ground, with Lambertian shading from one light. Depth is
ray-cast exactly (z-depth along the optical axis, metres). Everything is vectorized numpy over pixels; one scene
is a deterministic function of `(seed, index)`.

The scenes carry the monocular cues a small network can learn from: perspective texture gradients on the
ground, occlusion of objects, contact of objects with the ground, shading, and the horizon of the back wall.
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
    """

    hfov_deg: tuple[float, float] = (50.0, 80.0)
    camera_height_m: tuple[float, float] = (1.0, 2.0)
    pitch_deg: tuple[float, float] = (4.0, 20.0)
    room_depth_m: tuple[float, float] = (7.0, FAR_CAP_M - 1.0)
    room_half_width_m: tuple[float, float] = (3.0, 7.0)
    num_objects: tuple[int, int] = (3, 9)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


# Primitive ids in the per-pixel hit map.
_GROUND, _BACK, _LEFT, _RIGHT, _CEILING, _FIRST_OBJECT = range(6)


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
    vs, us = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    d_cam_N3 = np.stack([(us - cx) / fx, -(vs - cy) / fy, np.ones_like(us)], -1).reshape(-1, 3)
    cp, sp, cyw, syw = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rot_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])  # rotates the view down by `pitch`
    rot_yaw = np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]])
    rot_world_from_cam = rot_yaw @ rot_pitch  # d_world = R d_cam; row vectors map back to the camera with `@ R`
    d_N3 = (d_cam_N3 @ rot_world_from_cam.T).astype(np.float32)  # world: x right, y up, z forward
    origin = np.array([rng.uniform(-0.5, 0.5), cam_h, 0.0], dtype=np.float32)

    def take(t_cand_N: np.ndarray, prim: int, normal, idx: np.ndarray | slice = slice(None)) -> None:
        """Keep the candidate hits at pixels `idx` that are nearer than what is there already."""
        t_old_N = t_N[idx]
        closer = (t_cand_N > 1e-6) & (t_cand_N < t_old_N)
        where = np.flatnonzero(closer) if isinstance(idx, slice) else idx[closer]
        t_N[where] = t_cand_N[closer]
        hit_N[where] = prim
        normal_N3[where] = normal if np.ndim(normal) == 1 else normal[closer]

    def pixels_of(corners_K3: np.ndarray) -> np.ndarray | slice:
        """Flat indices of the screen rectangle that holds the projection of a convex object's corners."""
        cam_K3 = (corners_K3 - origin) @ rot_world_from_cam
        if np.any(cam_K3[:, 2] <= 0.05):
            return slice(None)
        px_u = fx * cam_K3[:, 0] / cam_K3[:, 2] + cx
        px_v = cy - fy * cam_K3[:, 1] / cam_K3[:, 2]
        c0, c1 = max(int(px_u.min()) - 1, 0), min(int(px_u.max()) + 2, width)
        r0, r1 = max(int(px_v.min()) - 1, 0), min(int(px_v.max()) + 2, height)
        if c0 >= c1 or r0 >= r1:
            return np.zeros(0, dtype=np.int64)
        return (np.arange(r0, r1)[:, None] * width + np.arange(c0, c1)[None, :]).ravel()

    with np.errstate(divide="ignore", invalid="ignore"):
        # Room planes (axis, offset, id, normal): t = (offset - origin[axis]) / d[axis]; the nearest positive wins.
        room_depth = u(cfg.room_depth_m)
        planes = [(1, 0.0, _GROUND, (0, 1, 0)), (2, room_depth, _BACK, (0, 0, -1))]
        half_w = u(cfg.room_half_width_m) if rng.random() < 0.7 else None
        if half_w is not None:
            planes += [(0, -half_w, _LEFT, (1, 0, 0)), (0, half_w, _RIGHT, (-1, 0, 0))]
        if rng.random() < 0.4:
            planes.append((1, cam_h + rng.uniform(0.8, 2.0), _CEILING, (0, -1, 0)))
        half_w = 8.0 if half_w is None else half_w
        t_PN = np.stack([(offset - origin[axis]).astype(np.float32) / d_N3[:, axis] for axis, offset, _, _ in planes])
        t_PN[~(t_PN > 1e-6)] = np.inf
        nearest_N = t_PN.argmin(0)
        t_N = np.take_along_axis(t_PN, nearest_N[None], 0)[0]
        hit_N = np.array([p[2] for p in planes])[nearest_N]
        normal_N3 = np.take(np.array([p[3] for p in planes], dtype=np.float32), nearest_N, axis=0)

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
                idx = pixels_of(corners_K3)
                d_M3 = d_N3[idx]
                t_lo_M3 = (lo - origin) / d_M3
                t_hi_M3 = (hi - origin) / d_M3
                t_near_M3 = np.minimum(t_lo_M3, t_hi_M3)
                t_near_M = t_near_M3.max(1)
                t_far_M = np.maximum(t_lo_M3, t_hi_M3).min(1)
                t_box_M = np.where((t_near_M <= t_far_M) & (t_far_M > 0), t_near_M, np.inf)
                axis_M = t_near_M3.argmax(1)
                rows_M = np.arange(len(axis_M))
                box_normal_M3 = np.zeros_like(d_M3)
                box_normal_M3[rows_M, axis_M] = -np.sign(d_M3[rows_M, axis_M])
                take(t_box_M, prim, box_normal_M3, idx)
            else:
                radius = rng.uniform(0.25, 0.9)
                center = np.array([x, radius, z])
                corners_K3 = center + radius * np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
                idx = pixels_of(corners_K3)
                d_M3 = d_N3[idx]
                oc = origin - center
                b_M = d_M3 @ oc
                a_M = (d_M3 * d_M3).sum(1)
                disc_M = b_M * b_M - a_M * (oc @ oc - radius * radius)
                t_sph_M = np.where(disc_M >= 0, (-b_M - np.sqrt(np.maximum(disc_M, 0))) / a_M, np.inf)
                sph_normal_M3 = (origin + t_sph_M[:, None] * d_M3 - center) / radius
                take(t_sph_M, prim, np.nan_to_num(sph_normal_M3, posinf=0.0, neginf=0.0), idx)

    # Surface appearance: per-primitive colours and pattern parameters, evaluated per pixel in world coordinates.
    num_prims = _FIRST_OBJECT + num_objects
    base_rgb_P3 = rng.uniform(0.15, 0.95, (num_prims, 3)).astype(np.float32)
    alt_rgb_P3 = (base_rgb_P3 * rng.uniform(0.3, 0.8, (num_prims, 1))).astype(np.float32)
    pattern_P = rng.integers(0, 3, num_prims)  # 0 checker, 1 stripes, 2 smooth waves
    period_P = rng.uniform(0.15, 0.8, num_prims).astype(np.float32)
    hit_N = np.where(np.isfinite(t_N), hit_N, _BACK)
    t_N = np.where(np.isfinite(t_N), t_N, FAR_CAP_M)
    point_N3 = origin + t_N[:, None] * d_N3
    # Two tangent coordinates of the hit surface, so textures shrink with distance (a perspective cue).
    major_N = np.abs(normal_N3).argmax(1)  # the axis the surface faces
    uv_N2 = np.stack(
        [
            np.where(major_N == 0, point_N3[:, 2], point_N3[:, 0]),
            np.where(major_N == 1, point_N3[:, 2], point_N3[:, 1]),
        ],
        1,
    )
    scaled_N2 = uv_N2 / period_P[hit_N][:, None]
    checker_N = (np.floor(scaled_N2[:, 0]) + np.floor(scaled_N2[:, 1])) % 2
    stripes_N = np.floor(scaled_N2[:, 0] + 0.5 * scaled_N2[:, 1]) % 2
    waves_N = 0.5 + 0.5 * np.sin(2.0 * scaled_N2[:, 0]) * np.sin(1.3 * scaled_N2[:, 1])
    mix_N = np.choose(pattern_P[hit_N], [checker_N, stripes_N, waves_N])
    albedo_N3 = np.take(base_rgb_P3, hit_N, axis=0)
    albedo_N3 += np.take(alt_rgb_P3 - base_rgb_P3, hit_N, axis=0) * mix_N[:, None]

    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.8, -0.2)], dtype=np.float32)
    light /= np.linalg.norm(light)
    lambert_N = np.clip(normal_N3 @ light, 0, 1)
    ambient = np.float32(rng.uniform(0.25, 0.45))
    falloff_N = 1.0 / (1.0 + np.float32(0.02) * t_N)  # a little atmospheric dimming with distance
    rgb_N3 = albedo_N3 * (ambient + (1 - ambient) * lambert_N)[:, None] * falloff_N[:, None]
    noise_N3 = rng.integers(-2, 3, rgb_N3.shape, dtype=np.int16)  # sensor noise, +-2 grey levels
    image_HW3 = np.clip(rgb_N3 * 255 + 0.5, 0, 255).astype(np.int16) + noise_N3
    image_HW3 = np.clip(image_HW3, 0, 255).astype(np.uint8).reshape(height, width, 3)

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
