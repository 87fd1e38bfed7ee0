"""Shared fixtures: a tiny random Stable Diffusion saved to disk, and external tool lookups."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT, require_tool
from tiny_sd import save_tiny_stable_diffusion

# Blender (the bpy module) keeps its user files here, not in the home folder: set before bpy loads.
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="promptmesh-blender-"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In a models folder of its own, so that a test server can offer it (`--models-dir`) by name."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def gltf_validator() -> list[str]:
    """The command that runs the Khronos glTF validator on a file given after it."""
    modules = Path(os.environ.get("GLTF_VALIDATOR_NODE_MODULES", ROOT / ".ci" / "node" / "node_modules"))
    require_tool(shutil.which("node") is not None and (modules / "gltf-validator").is_dir(),
                 f"npm gltf-validator (npm install --prefix {modules.parent} gltf-validator)")
    os.environ["NODE_PATH"] = str(modules)
    return ["node", str(ROOT / "tests" / "gltf_validate.js")]


_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave at once when Blender and torch share this process. bpy 4.5's exit handlers
    deadlock there after a glTF export (its file-closing thread waits on a condition variable
    its own destructor is destroying); `promptmesh export` avoids it by never loading torch.
    Every report has been written by now."""
    if _exit_status is not None and "bpy" in sys.modules and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
