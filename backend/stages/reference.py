"""The NeRF stage of an image job, Magic123's structure (Qian et al. 2023): the reference camera
(azimuth 0, the object's front; the image's elevation and field of view) reconstructs the
image's colour on its foreground and its mask as the render's opacity, while every other view
gets score distillation from the text prior (the prompt, or an empty one) and, where the job
names one, from a novel-view prior (Zero-1-to-3) conditioned on the image, each through the one
guidance code and weighted as the paper's joint prior weighs them. The loop, mesh stage and
bake are the text job's.

The image is recentred first, as Magic123 and stable-dreamfusion preprocess theirs: its
foreground's box is centred and scaled so that its longer side spans the share of the frame
that an object of FIT_HALF_EXTENT (the embedded prior's training objects, and a texture job's
fitted mesh) spans in the prior's own renders at the mean of its camera ranges. The reference
camera starts at the distance that keeps that framing at the image's field of view; with
`reference.offset_lr`, where it stands is learnt with the field (a box is not where a prior
centres a lopsided object, nor at its size: docs/image_to_3d.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...shared.image import Reference
from ..cameras import Cameras, orbit_cameras
from ..framing import FIT_HALF_EXTENT, frame_share, recentre, reference_camera
from ..guidance.zero123 import ImageEmbeddings, NovelViewGuidance
from .context import JobContext
from .loop import rgba_uint8
from .nerf import NeRFModel


class ReferenceNeRFModel(NeRFModel):
    """The NeRF stage with Magic123's reference-view terms beside score distillation."""

    def __init__(self, ctx: JobContext, seed: int, reference: Reference, novel: NovelViewGuidance | None = None) -> None:
        super().__init__(ctx, seed)
        r = ctx.recipe
        self.reference = reference
        self.camera = reference_camera(r.cameras, reference.elevation, reference.fov).to(ctx.device)
        self.offset = torch.zeros(3, device=ctx.device, requires_grad=r.reference.offset_lr > 0)  # the camera's move
        if r.reference.offset_lr > 0:
            self.optimizer.add_param_group({"params": [self.offset], "lr": r.reference.offset_lr})
        rgb, mask = recentre(reference.rgba, r.resolution, frame_share(r.cameras))
        self.image, self.mask = rgb.to(ctx.device), mask.to(ctx.device)
        self.novel = novel
        self.novel_cond: ImageEmbeddings | None = None
        if novel is not None:  # the image at the 3D prior's own size, on white as its training images
            rgb, mask = recentre(reference.rgba, novel.image_size, frame_share(r.cameras))
            fov = float(torch.rad2deg(self.camera.fovy[0]))
            self.novel_cond = novel.embed_image(rgb * mask + (1 - mask), reference.elevation, float(self.camera.distance[0]),
                                                fov, FIT_HALF_EXTENT)

    def distill(self, images: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """Magic123's joint prior: the 2D (text) prior's distillation and, with a novel-view
        prior, its distillation given the image and each view's camera relative to the
        reference, weighted prior_2d_weight and prior_3d_weight."""
        settings = self.ctx.recipe.reference
        loss = settings.prior_2d_weight * super().distill(images, cameras)
        if self.novel is not None and self.novel_cond is not None:
            loss = loss + settings.prior_3d_weight * self.novel.sds_loss(
                images, self.novel_cond, cameras, settings.novel_view_guidance_scale, self.t_range(), self.ctx.generator)
        return loss

    def loss(self) -> torch.Tensor:
        """The joint prior's distillation and the regularisers, plus, every `reference.every`
        steps, the reference view's colour error on the foreground and its opacity's error
        against the mask, each summed over pixels."""
        loss = super().loss()
        if self.step % self.ctx.recipe.reference.every == 0:
            loss = loss + self.reference_loss()
        return loss

    @property
    def reference_view(self) -> Cameras:
        """The reference camera where it stands now (moved by the learnt offset)."""
        return self.camera.moved(self.offset)

    def reference_loss(self) -> torch.Tensor:
        r = self.ctx.recipe
        out = self.render_training(self.reference_view, "lambertian")
        rgb_error = (self.mask * (out.rgb - self.image) ** 2).sum()
        mask_error = ((out.opacity - self.mask) ** 2).sum()
        return r.reference.rgb_weight * rgb_error + r.reference.mask_weight * mask_error

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reference_offset": self.offset.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "reference_offset" in state:  # a checkpoint from before the camera was learnt stood still
            with torch.no_grad():
                self.offset.copy_(state["reference_offset"])
        super().load_state_dict(state)

    @torch.no_grad()
    def preview(self, size: int = 64) -> np.ndarray:
        """The reference image (as recentred, on white) beside a render from the orbit."""
        image = self.image * self.mask + (1 - self.mask)
        ref = rgba_uint8(F.interpolate(image, (size, size), mode="nearest"),
                         F.interpolate(torch.ones_like(self.mask), (size, size), mode="nearest"))[0]
        view = self.render_rgba(orbit_cameras(1, start_azimuth=(self.step * 7.0) % 360.0), size)[0]
        return np.concatenate([ref, view], axis=1)
