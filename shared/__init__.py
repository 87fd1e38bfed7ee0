"""Code both sides of PromptMesh import: the job spec and its validation, the error codes, the
wire protocol and client, result files, and Blender mesh I/O. No torch, so the Blender add-on
can vendor it (build_addon.py copies this folder into the add-on)."""
