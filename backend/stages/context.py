"""What every stage of one job shares, passed explicitly: the prior, the prompt's embeddings,
the resolved recipe, the job's one random generator, the device and the distillation
objective's own state (VSD's LoRA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cameras import Cameras, sample_views
from ..guidance.base import Guidance
from ..guidance.vsd import ObjectiveState
from ..prompts import PromptEmbeddings
from ..recipe import Recipe


@dataclass
class JobContext:
    guidance: Guidance
    embeddings: PromptEmbeddings
    recipe: Recipe
    generator: torch.Generator  # every random draw of the job, so a seed repeats the job
    device: torch.device
    objective: ObjectiveState  # what the objective carries from step to step; in every checkpoint

    @classmethod
    def create(cls, guidance: Guidance, embeddings: PromptEmbeddings, recipe: Recipe, seed: int,
               device: torch.device) -> JobContext:
        state = guidance.objective_state(recipe.objective, recipe.schedule.steps, seed)
        return cls(guidance, embeddings, recipe, torch.Generator().manual_seed(seed), device, state)

    def sample_cameras(self) -> Cameras:
        """A training batch of cameras (a whole group for a multi-view prior)."""
        return sample_views(self.guidance.views_per_group, self.generator, self.recipe.cameras).to(self.device)

    def distill(self, images: torch.Tensor, cameras: Cameras, t_range: tuple[float, float]) -> torch.Tensor:
        """The score-distillation loss of renders seen from `cameras`: the one call every stage makes."""
        r = self.recipe
        loss = self.guidance.sds_loss(images, self.embeddings, cameras, r.guidance_scale, t_range, self.generator,
                                      r.view_prompts, r.objective, self.objective)
        self.objective.step += 1
        return loss

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the job's shared state: the generator and the objective's."""
        return {"generator": self.generator.get_state(), "objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if "objective" in state:
            self.objective.load_state_dict(state["objective"])
