"""Import time of a 200k-face result into Blender (bpy module), the add-on's path: npz -> object.

    python bench/blender_import.py [--faces 200000] [--repeats 5]

Prints the median seconds per import (mesh, colour attribute, material, link) against the
0.5 s target, and the size of each add-on zip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import bpy

    import build_addon
    from promptmesh.shared.blender_io import create_object

    side = int(np.sqrt(args.faces / 4)) + 2  # a UV sphere of n x n segments has about 4 n^2 faces
    sphere = trimesh.creation.uv_sphere(radius=0.5, count=[side, side])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "mesh.npz"
        np.savez(npz, vertices=sphere.vertices.astype(np.float32), faces=sphere.faces.astype(np.int32),
                 colors=rng.random((len(sphere.vertices), 3), dtype=np.float32))
        times = []
        for _ in range(args.repeats):
            bpy.ops.wm.read_factory_settings(use_empty=True)
            t0 = time.perf_counter()
            with np.load(npz) as data:
                obj = create_object(bpy.context, "bench", data["vertices"], data["faces"], data["colors"])
            times.append(time.perf_counter() - t0)
        faces = len(obj.data.polygons)
        median = statistics.median(times)
        print(f"import {faces} faces, {len(obj.data.vertices)} vertices: median {median:.3f} s over {args.repeats} "
              f"(min {min(times):.3f}); target {TARGET_S} s -> {TARGET_S / median:.1f}x headroom")
        for path in build_addon.build(Path(tmp) / "dist"):
            print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
