"""Texturing meshes we did not make: does the prompt's colour land on them, evenly?

Each of the five shapes is a trimesh primitive at an odd scale and place (a 2.5-radius sphere
at x = 10, a cone of height 3, a torus...), plus a cube that brings its own UVs (one chart per
side); every one is painted "a COLOUR SHAPE" with the embedded prior through `pipeline.run`
(its texture baked at 256 px). Each result is judged from outside, from its baked texture as a
viewer shows it: 16 renders (8 azimuths at 0 and 30 degrees elevation, 64 px, flat albedo,
nearest texel) give the visible surface's mean colour, judged by the palette hue (judge.py),
and the share of visible pixels within CIELAB distance 15 of that mean (no seams, holes or
unpainted patches). It also checks the mesh came back in place and size. Asserts nothing.

    python bench/texture.py [--colors red,blue] [--seeds 1] [--steps N] [--shapes cube,torus] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import report as figure  # noqa: E402
from pool import run_all  # noqa: E402

from promptmesh.backend.prior.shapes import PALETTE, SHAPES  # noqa: E402

EVEN_DELTA_E = 15.0  # CIELAB distance of a visible pixel from the mean that still counts as even
OWN_UVS = "cube+uvs"


def given_mesh(shape: str) -> tuple[trimesh.Trimesh, np.ndarray | None]:
    """The mesh to paint for a shape name, at an odd scale and place, and its UVs if it has them."""
    c = trimesh.creation
    if shape == OWN_UVS:
        return cube_with_uvs()
    mesh = {"sphere": lambda: c.icosphere(subdivisions=3, radius=2.5), "cube": lambda: c.box(extents=(3.0, 3.0, 3.0)),
            "cylinder": lambda: c.cylinder(radius=0.4, height=1.0, sections=48),
            "cone": lambda: c.cone(radius=1.5, height=3.0, sections=48),
            "torus": lambda: c.torus(major_radius=2.0, minor_radius=0.7)}[shape]()
    mesh.apply_translation({"sphere": (10, 0, -4), "cube": (-5, 7, 2), "cylinder": (0.3, 0.2, 5), "cone": (2, 2, 2),
                            "torus": (-3, -3, -3)}[shape])
    return mesh, None


def cube_with_uvs() -> tuple[trimesh.Trimesh, np.ndarray]:
    """A 1.6-unit cube whose six sides each own a cell of a 3 x 2 UV grid (as a modeller unwraps one)."""
    mesh = trimesh.creation.box(extents=(1.6, 1.6, 1.6))
    mesh.unmerge_vertices()  # three vertices per triangle, so each side can own its UVs
    mesh.apply_translation((0.5, -8.0, 3.0))
    normals = mesh.face_normals
    uvs = np.zeros((len(mesh.vertices), 2), np.float32)
    for face, normal in enumerate(normals):
        axis = int(np.abs(normal).argmax())
        side = axis * 2 + int(normal[axis] > 0)  # 0..5
        plane = [i for i in range(3) if i != axis]
        corners = mesh.vertices[mesh.faces[face]][:, plane]
        local = (corners - mesh.bounds[0][plane]) / np.ptp(mesh.bounds[:, plane], 0)  # 0..1 on the side
        cell = np.array([side % 3, side // 3])
        uvs[mesh.faces[face]] = ((cell + 0.05 + 0.9 * local) / np.array([3, 2])).astype(np.float32)
    return mesh, uvs


def visible_colours(mesh, size: int = 64) -> np.ndarray:
    """sRGB colours [N, 3] of the pixels the textured mesh covers in 16 views, nearest texel."""
    import torch

    from promptmesh.backend.cameras import orbit_cameras
    from promptmesh.backend.raster import project, rasterize
    from promptmesh.backend.stages import Surface

    centre, scale = Surface(mesh.vertices, mesh.faces).fit()
    vertices = torch.from_numpy(((mesh.vertices - centre) * scale).astype(np.float32))
    faces = torch.from_numpy(mesh.faces.astype(np.int64))
    uvs = torch.from_numpy(mesh.uvs)
    out = []
    for elevation in (0.0, 30.0):
        cameras = orbit_cameras(8, elevation=elevation)
        with torch.no_grad():
            frags = rasterize(project(vertices, cameras, size, size), faces, size, size)
            uv = frags.interpolate(uvs, faces)[frags.face >= 0].numpy()
        h, w = mesh.texture.shape[:2]
        cols = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
        rows = np.clip(((1 - uv[:, 1]) * h).astype(int), 0, h - 1)
        out.append(mesh.texture[rows, cols].astype(np.float32) / 255)
    return np.concatenate(out)


def texture_and_judge(shape: str, color: str, seed: int, steps: int | None) -> tuple:
    """(shape, colour, seed, judged colour, even share, in place, seconds)."""
    from skimage.color import rgb2lab

    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import color_word
    from promptmesh.backend.stages import Surface
    from promptmesh.shared.spec import JobSpec

    given, uvs = given_mesh(shape)
    word = "cube" if shape == OWN_UVS else shape
    t0 = time.perf_counter()
    result = run(JobSpec(prompt=f"a {color} {word}", seed=seed, steps=steps, texture_size=256),
                 surface=Surface.checked(given.vertices, given.faces, uvs))
    seconds = time.perf_counter() - t0
    mesh = result.mesh
    in_place = bool(np.allclose(mesh.vertices.min(0), given.bounds[0], atol=1e-4)
                    and np.allclose(mesh.vertices.max(0), given.bounds[1], atol=1e-4))
    seen = visible_colours(mesh)
    mean = seen.mean(0)
    lab = rgb2lab(seen[None])[0]
    even = float((np.linalg.norm(lab - rgb2lab(mean[None, None])[0, 0], axis=1) < EVEN_DELTA_E).mean())
    return shape, color, seed, color_word(mean), even, in_place, seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join([*SHAPES, OWN_UVS]))
    p.add_argument("--colors", default=",".join(PALETTE))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="texture steps (default: the card's, recipe.texture.steps)")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    args = p.parse_args()
    jobs = [(shape, color, seed, args.steps) for shape in args.shapes.split(",") for color in args.colors.split(",")
            for seed in range(args.seeds)]
    rows: list[tuple] = []

    def report(row: tuple) -> None:
        rows.append(row)
        shape, color, seed, judged, even, in_place, seconds = row
        print(f"{'a ' + color + ' ' + shape:<24} {seed:>4} {judged:<7} even {even:6.1%} {'in place' if in_place else 'MOVED':<9} "
              f"{seconds:5.1f} s", flush=True)

    run_all(texture_and_judge, jobs, args.workers, report)
    right = sum(r[3] == r[1] for r in rows)
    evens = [r[4] for r in rows]
    print(f"colour right {right}/{len(rows)} ({right / len(rows):.0%}); even share mean {statistics.mean(evens):.1%}, "
          f"min {min(evens):.1%}, at least 95 % on {sum(e >= 0.95 for e in evens)}/{len(rows)}; "
          f"in place {sum(r[5] for r in rows)}/{len(rows)}; median {statistics.median(r[6] for r in rows):.1f} s per mesh")
    figure("colour_right", 100 * right / len(rows), "%")
    figure("even_mean", 100 * statistics.mean(evens), "%")
    figure("even_min", 100 * min(evens), "%")
    figure("even_at_least_95", sum(e >= 0.95 for e in evens), "runs")
    figure("seconds_per_mesh", statistics.median(r[6] for r in rows), "s")


if __name__ == "__main__":
    main()
