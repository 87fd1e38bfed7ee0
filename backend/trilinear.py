"""Trilinear lookups of the hash grid's dense levels on the CPU: every level in one pass.

ATen's CPU `grid_sample` in 3D is scalar code parallel over the batch only, one call per level
and per point set: on the tiny-SD step its forward and backward were about half the step. These
kernels compute what `grid_sample(mode="bilinear", padding_mode="border", align_corners=True)`
computes, in its float32 arithmetic (source index, clipping, corner weights), so results differ
from it by rounding only. The forward runs in parallel over points; the grid's backward in
parallel over levels, each level's gradient written by one thread, so no buffer is doubled per
thread and no two threads add to the same value. No installable library does this on the CPU
(tiny-cuda-nn is CUDA only); numba compiles them once and caches the machine code on disk.
CUDA keeps `grid_sample` (backend/field.py).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import numba
import numpy as np
import torch
from numba import njit, prange

F32 = np.float32


@njit(inline="always", cache=True)
def _cell(p: np.float32, size: int) -> tuple[int, np.floating, np.floating, np.floating]:
    """A coordinate in [-1, 1] -> its cell's lower index, the weights of the upper and lower
    corner, and d(index)/d(coordinate) (zero where border padding clips it), as ATen does."""
    top = F32(size - 1)
    pos = (p + F32(1.0)) * F32(0.5) * top
    slope = F32(0.5) * top
    if pos <= F32(0.0):
        pos, slope = F32(0.0), F32(0.0)
    elif pos >= top:
        pos, slope = top, F32(0.0)
    i = min(int(pos), size - 2)
    return i, pos - F32(i), F32(i + 1) - pos, slope


def _forward(x, grids, active, out):
    for level in range(active):  # a level's grid taken from the tuple once, not once per point
        g = grids[level]
        f, s = g.shape[0], g.shape[1]
        for n in prange(x.shape[0]):
            x0, fx, gx, _ = _cell(x[n, 0], s)
            y0, fy, gy, _ = _cell(x[n, 1], s)
            z0, fz, gz, _ = _cell(x[n, 2], s)
            for c in range(f):
                out[n, level * f + c] = (
                    gz * (gy * (gx * g[c, z0, y0, x0] + fx * g[c, z0, y0, x0 + 1])
                          + fy * (gx * g[c, z0, y0 + 1, x0] + fx * g[c, z0, y0 + 1, x0 + 1]))
                    + fz * (gy * (gx * g[c, z0 + 1, y0, x0] + fx * g[c, z0 + 1, y0, x0 + 1])
                            + fy * (gx * g[c, z0 + 1, y0 + 1, x0] + fx * g[c, z0 + 1, y0 + 1, x0 + 1])))


def _backward_grids(x, grad_out, grads, active):
    for level in prange(active):  # one thread owns a level's gradient: no races, no copies
        g = grads[level]
        f, s = g.shape[0], g.shape[1]
        g[:] = 0  # zeroed by the thread that adds to it, while the level is in its cache
        for n in range(x.shape[0]):
            x0, fx, gx, _ = _cell(x[n, 0], s)
            y0, fy, gy, _ = _cell(x[n, 1], s)
            z0, fz, gz, _ = _cell(x[n, 2], s)
            for c in range(f):
                lo, hi = gz * grad_out[n, level * f + c], fz * grad_out[n, level * f + c]
                g[c, z0, y0, x0] += lo * gy * gx
                g[c, z0, y0, x0 + 1] += lo * gy * fx
                g[c, z0, y0 + 1, x0] += lo * fy * gx
                g[c, z0, y0 + 1, x0 + 1] += lo * fy * fx
                g[c, z0 + 1, y0, x0] += hi * gy * gx
                g[c, z0 + 1, y0, x0 + 1] += hi * gy * fx
                g[c, z0 + 1, y0 + 1, x0] += hi * fy * gx
                g[c, z0 + 1, y0 + 1, x0 + 1] += hi * fy * fx


def _backward_points(x, grad_out, grids, active, grad_x):
    for n in prange(x.shape[0]):
        dx, dy, dz = F32(0.0), F32(0.0), F32(0.0)
        for level in range(active):
            g = grids[level]
            f, s = g.shape[0], g.shape[1]
            x0, fx, gx, sx = _cell(x[n, 0], s)
            y0, fy, gy, sy = _cell(x[n, 1], s)
            z0, fz, gz, sz = _cell(x[n, 2], s)
            for c in range(f):
                v000, v001 = g[c, z0, y0, x0], g[c, z0, y0, x0 + 1]
                v010, v011 = g[c, z0, y0 + 1, x0], g[c, z0, y0 + 1, x0 + 1]
                v100, v101 = g[c, z0 + 1, y0, x0], g[c, z0 + 1, y0, x0 + 1]
                v110, v111 = g[c, z0 + 1, y0 + 1, x0], g[c, z0 + 1, y0 + 1, x0 + 1]
                go = grad_out[n, level * f + c]
                dx += go * sx * (gz * (gy * (v001 - v000) + fy * (v011 - v010)) + fz * (gy * (v101 - v100) + fy * (v111 - v110)))
                dy += go * sy * (gz * (gx * (v010 - v000) + fx * (v011 - v001)) + fz * (gx * (v110 - v100) + fx * (v111 - v101)))
                dz += go * sz * (gy * (gx * (v100 - v000) + fx * (v101 - v001)) + fy * (gx * (v110 - v010) + fx * (v111 - v011)))
        grad_x[n, 0], grad_x[n, 1], grad_x[n, 2] = dx, dy, dz


def _compile(kernel: Callable[..., None]) -> tuple[Callable[..., None], Callable[..., None]]:
    """The kernel compiled serial (prange as range) and parallel. One thread runs the serial one:
    numba's OpenMP team, idle beside a one-thread torch, spins, and two one-thread jobs side by
    side took 4x as long a step. The copies are named apart so their disk caches stay apart."""
    def named(suffix: str) -> Callable[..., None]:
        copy = types.FunctionType(kernel.__code__, kernel.__globals__, kernel.__name__ + suffix)
        copy.__qualname__ = copy.__name__
        return copy
    return njit(cache=True)(named("_serial")), njit(parallel=True, cache=True)(named("_parallel"))


FORWARD, BACKWARD_GRIDS, BACKWARD_POINTS = (_compile(k) for k in (_forward, _backward_grids, _backward_points))


def _arrays(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """[1, F, D, H, W] tensors as the [F, D, H, W] arrays the kernels index (no copies)."""
    return tuple(t.detach()[0].numpy() for t in tensors)


def _threads() -> int:
    """Which of a kernel's two builds runs: as many threads as torch uses now (the thread tuner
    changes it), capped at numba's pool."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]  # set at import
    if threads > 1:
        numba.set_num_threads(threads)
    return int(threads > 1)


class DenseLookup(torch.autograd.Function):
    """[N, 3] points in [-1, 1] (x, y, z) and [1, F, R, R, R] grids laid out [z, y, x] ->
    [N, levels * F] features, level-major; levels from `active` on give zeros and no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, active: int, *grids: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()
        out = x.new_zeros(x.shape[0], len(grids) * grids[0].shape[1])
        FORWARD[_threads()](x.numpy(), _arrays(grids), active, out.numpy())
        ctx.save_for_backward(x, *grids)
        ctx.active = active
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *grids = ctx.saved_tensors
        go = grad_out.contiguous().numpy()
        parallel = _threads()
        grads = [torch.empty_like(g) if level < ctx.active else g.new_zeros(1, g.shape[1], 0, 0, 0)
                 for level, g in enumerate(grids)]
        if any(ctx.needs_input_grad[2:]):
            BACKWARD_GRIDS[parallel](x.numpy(), go, _arrays(grads), ctx.active)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            BACKWARD_POINTS[parallel](x.numpy(), go, _arrays(grids), ctx.active, grad_x.numpy())
        wanted = ctx.needs_input_grad[2:]
        return (grad_x, None, *(g if g.numel() and want else None for g, want in zip(grads, wanted, strict=True)))


def lookup(x: torch.Tensor, grids: Sequence[torch.Tensor], active: int) -> torch.Tensor:
    """Every dense level's trilinear features at x (float32 CPU tensors), in one pass."""
    return DenseLookup.apply(x, min(active, len(grids)), *grids)
