"""The NeRF field: a multiresolution hash-grid encoding in plain PyTorch and a small MLP that
gives density and albedo.

Coarse levels whose grid fits the table are stored densely and sampled with the native
trilinear `grid_sample` (as Instant-NGP does for levels that need no hashing); finer levels
are hashed with Instant-NGP's primes. Levels are switched on coarse-to-fine during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cameras import BOUND_RADIUS
from .trilinear import lookup

PRIMES = (1, 2654435761, 805459861)
MLP_CHUNK_ROWS = 4096  # 1 MB of 64-wide hidden layer: 17 ms for 133k rows, 18 at 2,048, 21 at 16,384 (2 threads)


@dataclass(frozen=True)
class FieldConfig:
    """The NeRF field's hash-grid levels, MLP width, initial density blob and bounding radius."""

    levels: int = 8
    features_per_level: int = 2
    log2_table_size: int = 21  # levels whose (res + 1)^3 fits are dense: on CPU that is all of them
    base_resolution: int = 16
    max_resolution: int = 112
    hidden: int = 64
    blob_density: float = 20.0  # pre-activation density added at the centre (Magic3D's blob)
    blob_radius: float = 0.6
    density_bias: float = -1.0
    radius: float = BOUND_RADIUS  # no density beyond this distance from the centre


class HashGrid(nn.Module):
    """Multiresolution grid encoding of points in [-1, 1]^3 -> [N, levels * features]."""

    primes: torch.Tensor

    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        self.config = config
        growth = math.exp((math.log(config.max_resolution) - math.log(config.base_resolution)) / max(1, config.levels - 1))
        self.resolutions = [int(math.floor(config.base_resolution * growth**i)) for i in range(config.levels)]
        table = 2**config.log2_table_size
        f = config.features_per_level
        self.dense = nn.ParameterList()
        self.hashed = nn.ParameterList()
        for res in self.resolutions:
            if (res + 1) ** 3 <= table:
                self.dense.append(nn.Parameter(torch.empty(1, f, res + 1, res + 1, res + 1).uniform_(-1e-4, 1e-4)))
            else:
                self.hashed.append(nn.Parameter(torch.empty(table, f).uniform_(-1e-4, 1e-4)))
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.int64), persistent=False)
        self.active_levels = config.levels

    @property
    def output_dim(self) -> int:
        return self.config.levels * self.config.features_per_level

    def _hashed_level(self, x01: torch.Tensor, table: torch.Tensor, res: int) -> torch.Tensor:
        pos = x01 * res
        base = pos.floor().long()
        frac = pos - base
        corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], device=x01.device)
        idx = base[:, None, :] + corners[None]  # [N, 8, 3]
        h = (idx * self.primes).unbind(-1)
        slot = (h[0] ^ h[1] ^ h[2]) % table.shape[0]
        w = torch.where(corners[None].bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # [N, 8]
        return (table[slot] * w[..., None]).sum(1)

    def _dense_grid_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The dense levels by `grid_sample` (CUDA, and any dtype the CPU kernels don't take)."""
        # The CPU kernel of grid_sample parallelises over the batch only: the points are split
        # into one batch entry per thread (same values, the grid broadcast, not copied).
        n, f = x.shape[0], self.config.features_per_level
        parts = max(1, min(torch.get_num_threads(), n)) if x.device.type == "cpu" else 1
        padded = F.pad(x, (0, 0, 0, -n % parts)) if n % parts else x
        grid = padded.view(parts, 1, 1, -1, 3)
        # Their features are joined along the channels and laid out as [N, features] in one copy.
        # grid_sample wants (x, y, z) for (W, H, D); our tensors are laid out [D=z, H=y, W=x].
        dense = [
            F.grid_sample(param.expand(parts, -1, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=True)
            if level < self.active_levels else grid.new_zeros(parts, f, 1, 1, grid.shape[3])
            for level, param in enumerate(self.dense)
        ]  # each [parts, F, 1, 1, N / parts]
        return torch.cat(dense, 1).permute(0, 4, 1, 2, 3).reshape(-1, len(dense) * f)[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3] in [-1, 1]."""
        n, f = x.shape[0], self.config.features_per_level
        outs = []
        if self.dense:  # dense levels come first (their resolutions grow)
            fused = x.device.type == "cpu" and x.dtype == torch.float32 and self.dense[0].dtype == torch.float32
            outs.append(lookup(x, list(self.dense), self.active_levels) if fused else self._dense_grid_sample(x))
        for level, table in enumerate(self.hashed, start=len(self.dense)):
            if level >= self.active_levels:
                outs.append(x.new_zeros(n, f))
            else:
                outs.append(self._hashed_level((x.clamp(-1, 1) + 1) * 0.5, table, self.resolutions[level]))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class ChunkedMLP(torch.autograd.Function):
    """Linear-ReLU-Linear evaluated over row chunks that fit in cache, its hidden layer recomputed
    in the backward pass instead of stored.

    For the ~130k samples of a step, autograd's hidden layer is 34 MB, written and re-read five
    times: the pass is bound by memory, not arithmetic (2 CPU threads: 43 ms forward and backward,
    17 ms chunked). No installable library fuses an MLP on CPU (tiny-cuda-nn is CUDA only), and
    per-chunk `torch.utils.checkpoint` took 24 ms.
    """

    @staticmethod
    def hidden(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        """One chunk's hidden layer, the same in both passes (the backward recomputes it)."""
        return torch.addmm(b1, x, w1.t()).relu_()

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                chunk: int) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w2.shape[0])
        for s in range(0, x.shape[0], chunk):
            torch.addmm(b2, ChunkedMLP.hidden(x[s:s + chunk], w1, b1), w2.t(), out=out[s:s + chunk])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, b1, w2 = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w1, grad_b1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
        for s in range(0, x.shape[0], ctx.chunk):
            xc, gc = x[s:s + ctx.chunk], grad_out[s:s + ctx.chunk]
            hidden = ChunkedMLP.hidden(xc, w1, b1)
            grad_w2.addmm_(gc.t(), hidden)
            grad_hidden = torch.ops.aten.threshold_backward(gc @ w2, hidden, 0)  # ReLU's gradient, no mask tensor
            grad_w1.addmm_(grad_hidden.t(), xc)
            grad_b1 += grad_hidden.sum(0)
            if grad_x is not None:
                torch.mm(grad_hidden, w1, out=grad_x[s:s + ctx.chunk])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_out.sum(0), None


class NeRFField(nn.Module):
    """Density (softplus with a centred blob) and albedo (sigmoid) at points in the bound."""

    def __init__(self, config: FieldConfig = FieldConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config)
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, config.hidden), nn.ReLU(inplace=True), nn.Linear(config.hidden, 4),
        )

    @property
    def radius(self) -> float:
        """No density beyond this distance from the centre: the renderer samples only inside it."""
        return self.config.radius

    def blob(self, r: torch.Tensor) -> torch.Tensor:
        """Pre-activation density added at distance r from the centre."""
        return self.config.blob_density * (1 - r / self.config.blob_radius) + self.config.density_bias

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP on encoded points: chunked on CPU (see ChunkedMLP), as modules elsewhere."""
        if features.device.type != "cpu":
            return self.mlp(features)
        first, second = self.mlp[0], self.mlp[2]
        return ChunkedMLP.apply(features, first.weight, first.bias, second.weight, second.bias, MLP_CHUNK_ROWS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, 3] world points -> density [N], albedo [N, 3] (display colour)."""
        h = self.head(self.encoding(x / BOUND_RADIUS))
        r = x.norm(dim=-1)
        density = F.softplus(h[:, 0] + self.blob(r))
        if self.config.radius < BOUND_RADIUS:
            density = density * (r <= self.config.radius)
        return density, torch.sigmoid(h[:, 1:])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    def normals(self, x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
        """Outward unit normals, minus the normalised density gradient (central differences)."""
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps
        pts = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], 1).reshape(-1, 3)
        d = self.density(pts).view(-1, 2, 3)
        grad = (d[:, 0] - d[:, 1]) / (2 * eps)
        return -F.normalize(grad, dim=-1)
