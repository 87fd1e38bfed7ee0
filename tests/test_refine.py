"""The refinement stage's optimisation (DMTet through the rasteriser) on a known target."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import trimesh

from promptmesh.backend.cameras import Cameras
from promptmesh.backend.guidance.embedded import EmbeddedGuidance
from promptmesh.backend.guidance.loading import model_card
from promptmesh.backend.prior.judge import judge_mesh
from promptmesh.backend.raster import project, rasterize
from promptmesh.backend.recipe import RefineSettings
from promptmesh.backend.shading import ShadingConfig
from promptmesh.backend.stages import DMTetModel, JobContext, NeRFModel

HALF = 0.4  # the target: an axis-aligned cube of side 0.8


class SphereField(torch.nn.Module):
    """A first stage that missed: a red ball where the target is a cube."""

    radius = 0.75

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * torch.sigmoid(-(x.norm(dim=-1) - HALF * 1.1) / 0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.density(x), torch.tensor([0.8, 0.1, 0.1]).expand(len(x), 3)


class SilhouetteGuidance(EmbeddedGuidance):
    """A prior that knows the target exactly: its loss is the squared difference between the
    render and the target cube's antialiased silhouette from the same camera."""

    target = trimesh.creation.box(extents=(2 * HALF,) * 3)

    def sds_loss(self, images, embeddings, cameras: Cameras, guidance_scale, t_range, generator, views=None,  # type: ignore[override]
                 objective=None, state=None):
        size = images.shape[-1]
        verts = torch.tensor(self.target.vertices, dtype=torch.float32)
        alpha = rasterize(project(verts, cameras, size, size), torch.tensor(self.target.faces), size, size, 0.5).alpha
        want = 1 - alpha[:, None] * (1 - torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1))  # red on white
        return ((images - want) ** 2).sum() / len(images) * 50.0


def test_refinement_moves_the_surface_towards_the_target():
    guidance = SilhouetteGuidance(model_card("embedded"))
    recipe = replace(guidance.recipe, shading=ShadingConfig(albedo=1.0, textureless=0.0),  # flat red, as the target
                     refine=RefineSettings(steps=80, grid=24, resolution=48, color_share=0.0, lr_sdf=2e-3,
                                           lr_offset=2e-2, normal_weight=0.1, laplacian_weight=0.0))
    ctx = JobContext.create(guidance, guidance.embed_prompt("a red cube"), recipe, 0, torch.device("cpu"))
    nerf = NeRFModel(ctx, 0)
    nerf.field = SphereField()  # type: ignore[assignment]
    refiner = DMTetModel(ctx, nerf, 25.0)  # the level where the ball's density is half
    before = refiner.extract(None)
    for _ in range(recipe.refine.steps):
        refiner.train_step()
    after = refiner.extract(None)
    iou_before, iou_after = judge_mesh(before).ious["cube"], judge_mesh(after).ious["cube"]
    assert iou_after > iou_before + 0.04, (iou_before, iou_after)
    assert np.allclose(after.colors, [0.8, 0.1, 0.1], atol=1e-6)
