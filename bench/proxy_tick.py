"""The add-on's timer tick while it shows a 20k-face live proxy: decoding the `proxy` message
and updating the proxy object in place, in real Blender (the bpy module) with the add-on
installed from its zip.

    python bench/proxy_tick.py [--faces 20000] [--repeats 20]

Prints the median and worst milliseconds per update against the 15 ms target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_MS = 15.0
MODULE = "bl_ext.user_default.promptmesh"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="promptmesh-bench-"))
    import bpy

    import build_addon
    from promptmesh.shared import protocol as P
    from promptmesh.shared.result import Mesh, proxy_arrays

    with tempfile.TemporaryDirectory() as tmp:
        (zip_path,) = build_addon.build(Path(tmp), ["linux-x64"])
        bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
    session = sys.modules[f"{MODULE}.session"]
    side = int(np.sqrt(args.faces / 4)) + 2
    rng = np.random.default_rng(0)
    times = []
    for i in range(args.repeats):
        sphere = trimesh.creation.uv_sphere(radius=0.5, count=[side + i % 2, side])  # the count changes each time
        v = sphere.vertices.astype(np.float32)
        mesh = Mesh(v, sphere.faces.astype(np.int32), rng.random(v.shape, dtype=np.float32), v)
        frames = P.encode(P.Message("proxy", "", "0" * 16, {"step": i}, proxy_arrays(mesh)))
        t0 = time.perf_counter()
        session.show_proxy(P.decode(frames, P.SERVER_TYPES))
        times.append((time.perf_counter() - t0) * 1000)
    obj = bpy.data.objects["PromptMesh Proxy"]
    print(f"proxy update of {len(obj.data.polygons)} faces, {len(obj.data.vertices)} vertices: median "
          f"{statistics.median(times):.1f} ms, worst {max(times[1:]):.1f} ms after the first ({times[0]:.1f} ms) "
          f"over {args.repeats}; target {TARGET_MS:g} ms")


if __name__ == "__main__":
    main()
