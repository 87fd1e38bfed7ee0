"""Code both sides of PromptMesh import: the job spec with its validation (and, later, the
wire protocol and client). Pure Python: no torch, so the Blender add-on can vendor it."""
