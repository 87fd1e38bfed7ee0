"""A deformable tetrahedral grid and marching tetrahedra in PyTorch (DMTet, Shen et al. 2021).

The grid: the cubes of an N^3 lattice over [-R, R]^3, each split into the six tetrahedra of
its Kuhn triangulation (the paths from corner 000 to 111 along the three axes in each order),
which match face to face across neighbouring cubes. Each grid vertex holds an SDF value
(negative inside) and an offset of at most half a cell. The surface is where the SDF
crosses zero along a tetrahedron's edges, at the linear interpolation of the two ends, so it
is differentiable in both the SDF values and the vertex positions. Triangles are turned
outwards (from the inside corners of their tetrahedron towards the outside ones), so no
orientation table is needed: each case only says which crossing edges form the triangles.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

LOCAL_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _case_table() -> torch.Tensor:
    """[16, 2, 3]: for each inside pattern (bit i: corner i inside), up to two triangles as local
    edge indices (-1: no triangle)."""
    edge_of = {pair: i for i, pair in enumerate(LOCAL_EDGES)} | {(b, a): i for i, (a, b) in enumerate(LOCAL_EDGES)}
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    for code in range(1, 15):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (1, 3):
            odd = inside[0] if len(inside) == 1 else outside[0]
            table[code, 0] = torch.tensor([edge_of[odd, j] for j in range(4) if j != odd])
        else:
            (a0, a1), (b0, b1) = inside, outside
            quad = [edge_of[a0, b0], edge_of[a0, b1], edge_of[a1, b1], edge_of[a1, b0]]  # a cycle round the quad
            table[code, 0] = torch.tensor(quad[:3])
            table[code, 1] = torch.tensor([quad[0], quad[2], quad[3]])
    return table


CASES = _case_table()


@dataclass
class TetGrid:
    """Vertices [V, 3], tetrahedra [T, 4], their unique edges [E, 2] and each tet's six edges [T, 6]."""

    vertices: torch.Tensor
    tets: torch.Tensor
    edges: torch.Tensor
    tet_edges: torch.Tensor
    cell: float  # the side of a cube

    @classmethod
    def cube(cls, resolution: int, radius: float, device: torch.device | str = "cpu") -> TetGrid:
        n = resolution + 1
        axis = torch.linspace(-radius, radius, n, device=device)
        vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        corner = torch.arange(resolution, device=device)
        i, j, k = (c.reshape(-1) for c in torch.meshgrid(corner, corner, corner, indexing="ij"))
        index = lambda di, dj, dk: ((i + di) * n + (j + dj)) * n + (k + dk)  # noqa: E731
        tets = []
        for order in itertools.permutations(range(3)):
            step = [0, 0, 0]
            path = [index(0, 0, 0)]
            for axis_ in order:
                step[axis_] = 1
                path.append(index(*step))
            tets.append(torch.stack(path, -1))
        tet = torch.cat(tets)
        pairs = tet[:, list(LOCAL_EDGES)].sort(-1).values  # [T, 6, 2]
        edges, inverse = torch.unique(pairs.reshape(-1, 2), dim=0, return_inverse=True)
        return cls(vertices, tet, edges, inverse.view(-1, 6), 2 * radius / resolution)


def marching_tets(grid: TetGrid, positions: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero level set of `sdf` [V] over the grid with vertices at `positions` [V, 3]:
    (vertices [M, 3], faces [K, 3] counter-clockwise seen from outside). Vertices are shared
    between the triangles of neighbouring tetrahedra (one per crossing edge)."""
    inside = sdf < 0
    code = (inside[grid.tets] * torch.tensor([1, 2, 4, 8], device=sdf.device)).sum(-1)
    live = (code > 0) & (code < 15)
    tets, code = grid.tets[live], code[live]
    local = grid.tet_edges[live]  # [L, 6]
    crossing = inside[grid.edges[:, 0]] != inside[grid.edges[:, 1]]
    vertex_of = torch.cumsum(crossing, 0) - 1  # index of each crossing edge's vertex
    a, b = grid.edges[crossing, 0], grid.edges[crossing, 1]
    sa, sb = sdf[a, None], sdf[b, None]
    vertices = (positions[a] * sb - positions[b] * sa) / (sb - sa)
    tri = CASES.to(sdf.device)[code]  # [L, 2, 3] local edges
    valid = tri[:, :, 0] >= 0  # [L, 2]
    faces = vertex_of[local.gather(1, tri.clamp_min(0).view(len(tri), 6)).view(-1, 2, 3)][valid]  # [K, 3]
    # turn every triangle outwards: its normal towards its tet's outside corners
    corners = positions[tets]  # [L, 4, 3]
    weight = inside[tets].float()
    centre_in = (corners * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    centre_out = (corners * (1 - weight)[..., None]).sum(1) / (1 - weight).sum(1, keepdim=True)
    outward = (centre_out - centre_in)[:, None].expand(-1, 2, -1)[valid]
    v = vertices[faces].detach()
    normal = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    flip = (normal * outward).sum(-1) < 0
    faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return vertices, faces
