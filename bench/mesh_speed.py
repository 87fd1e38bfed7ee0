"""Mesh extraction time at 128^3 and 256^3 on a freshly initialised field (density grid,
marching cubes, cleanup, colours), and peak memory. Prints figures; asserts nothing."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptmesh.backend.field import NeRFField  # noqa: E402
from promptmesh.backend.mesh import extract_mesh  # noqa: E402


def main() -> None:
    field = NeRFField()
    for res in (128, 256):
        t0 = time.perf_counter()
        mesh = extract_mesh(field.density, lambda x: field(x)[1], resolution=res)
        dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{res}^3: {dt:.2f} s, {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, peak RSS {peak:.0f} MB")
    print(f"threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
