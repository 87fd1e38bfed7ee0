"""PromptMesh backend: text-to-3D by Score Distillation Sampling, on CPU or CUDA."""

__version__ = "0.1.0"
