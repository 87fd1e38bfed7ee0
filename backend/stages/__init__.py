"""A job's stages. Each is a model in nerfstudio's sense, owning its parameters, optimiser
state, render, loss and checkpoint state; loop.py runs any of them, and what a job shares
travels in a JobContext."""

from .context import JobContext
from .dmtet import DMTetModel
from .loop import Checkpointer, StageModel, run_stage
from .nerf import NeRFModel
from .texture import Surface, TextureModel

__all__ = ["Checkpointer", "DMTetModel", "JobContext", "NeRFModel", "StageModel", "Surface", "TextureModel", "run_stage"]
