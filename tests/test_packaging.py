"""Packaging: the licences in the add-on zip, and the project's wheel installed on its own.

The wheel is built once per module (from a copy of the source tree, so no build/ folder lands in
the checkout and no stale file from an earlier build can slip in) with the test venv's own
setuptools, offline, and installed without dependencies into a fresh venv that sees nothing
else: what it can import there is exactly what the wheel ships.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT))
import build_addon  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME, VERSION = PYPROJECT["project"]["name"], PYPROJECT["project"]["version"]
DIST_INFO = f"{NAME}-{VERSION}.dist-info"
GPL3 = ("GNU GENERAL PUBLIC LICENSE", "Version 3, 29 June 2007")
MIT = ("MIT License", "Copyright (c) 2026 PromptMesh developers", "Permission is hereby granted, free of charge")
# Never copied into the tree the wheel is built from: caches, environments, earlier builds.
NOT_SOURCE = (".git", ".venv", ".cache", ".ci", "dist", "build", "runs", "out", ".hypothesis", ".pytest_cache",
              ".mypy_cache", ".ruff_cache", "__pycache__", "*.egg-info", "node_modules", "*.ckpt.pt")


def is_licence(name: str) -> bool:
    base = PurePosixPath(name).name.upper()
    return "LICENSE" in base or "LICENCE" in base or "COPYING" in base


# ---- licences --------------------------------------------------------------------------------
def test_licence_files_and_declarations_agree():
    root, addon = (ROOT / "LICENSE").read_text(), (ROOT / "addon" / "LICENSE").read_text()
    assert all(s in root for s in MIT)
    assert all(s in addon for s in GPL3) and "END OF TERMS AND CONDITIONS" in addon
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    manifest = tomllib.loads((ROOT / "addon" / "blender_manifest.toml").read_text())
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]


def test_addon_zip_carries_its_licence_shared_licence_and_wheel_licences(tmp_path):
    (zip_path,) = build_addon.build(tmp_path, ["linux-x64"])
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert {"LICENSE", "shared/LICENSE", "blender_manifest.toml"} <= set(names), "licence files missing from the zip"
        gpl = zf.read("LICENSE")  # at the root, beside blender_manifest.toml
        assert gpl == (ROOT / "addon" / "LICENSE").read_bytes()
        assert all(s in gpl.decode() for s in GPL3)
        mit = zf.read("shared/LICENSE")  # the vendored shared/ keeps its own (MIT) licence
        assert mit == (ROOT / "LICENSE").read_bytes()
        assert all(s in mit.decode() for s in MIT)
        wheels = [n for n in names if n.startswith("wheels/") and n.endswith(".whl")]
        assert {PurePosixPath(w).name.split("-")[0] for w in wheels} == {"msgpack", "pyzmq"}
        for wheel in wheels:
            with zipfile.ZipFile(io.BytesIO(zf.read(wheel))) as whl:
                licences = [n for n in whl.namelist()
                            if n.split("/")[0].endswith(".dist-info") and is_licence(n) and not n.endswith("/")]
                assert licences, f"{wheel} carries no licence file in its .dist-info"
                assert all(whl.read(n).strip() for n in licences), f"{wheel}: an empty licence file"


# ---- the wheel -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline with this venv's setuptools from a copy of the sources."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(work / "out"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed (setuptools>=77 in this venv?):\n{proc.stdout}{proc.stderr}"
    (path,) = (work / "out").glob("*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site packages, no pip of its own) holding only the wheel; its python."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return python


def test_wheel_holds_only_the_promptmesh_namespace_and_the_weights(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        metadata = zf.read(f"{DIST_INFO}/METADATA").decode()
        licence = zf.read(f"{DIST_INFO}/licenses/LICENSE")
    strays = [n for n in names if n.split("/")[0] not in ("promptmesh", DIST_INFO)]
    assert not strays, f"files outside promptmesh/ and the dist-info: {strays}"
    assert not [n for n in names if n.split("/")[0] in ("backend", "shared", "addon")]
    assert not [n for n in names if "addon" in n], "GPL add-on code in the MIT wheel"
    assert "License-Expression: MIT" in metadata.splitlines()
    assert licence == (ROOT / "LICENSE").read_bytes()
    weights = sorted("promptmesh/backend/prior/weights/" + p.relative_to(ROOT / "backend/prior/weights").as_posix()
                     for p in (ROOT / "backend" / "prior" / "weights").rglob("*") if p.is_file())
    assert [w for w in weights if w.endswith(".safetensors")], "no embedded prior weights in the source tree"
    cards = [f"promptmesh/backend/recipes/{p.name}" for p in (ROOT / "backend" / "recipes").glob("*.json")]
    assert "promptmesh/backend/prior/weights/recipe.json" in weights and cards
    missing = [w for w in [*weights, *cards] if w not in names]
    assert not missing, f"prior weights or model cards missing from the wheel: {missing}"
    for package in ("promptmesh/backend", "promptmesh/shared"):
        assert f"{package}/__init__.py" in names
    sources = [p.relative_to(ROOT).as_posix() for d in ("backend", "shared") for p in (ROOT / d).rglob("*.py")
               if "__pycache__" not in p.parts]
    missing = [s for s in sources if f"promptmesh/{s}" not in names]
    assert not missing, f"modules missing from the wheel (a package left out of [tool.setuptools] packages?): {missing}"


def test_installed_wheel_imports_only_under_promptmesh(installed, tmp_path):
    check = textwrap.dedent("""
        import importlib, importlib.metadata as md, json, sys
        out = {"prefix": sys.prefix, "base": sys.base_prefix}
        spec = importlib.import_module("promptmesh.shared.spec")
        out["spec"] = spec.__file__
        for name in ("backend", "shared"):
            try:
                importlib.import_module(name)
                out[name] = "imported"
            except ModuleNotFoundError as exc:
                out[name] = "ModuleNotFoundError:" + str(exc.name)
        dist = md.distribution("promptmesh")
        out["licence"] = dist.metadata["License-Expression"]
        out["scripts"] = [ep.value for ep in dist.entry_points if ep.group == "console_scripts"]
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(installed), "-I", "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    venv = installed.parent.parent
    assert Path(out["prefix"]) == venv and out["prefix"] != out["base"]
    assert Path(out["spec"]).is_relative_to(venv), f"promptmesh.shared.spec came from {out['spec']}, not the wheel"
    assert out["backend"] == "ModuleNotFoundError:backend"
    assert out["shared"] == "ModuleNotFoundError:shared"
    assert out["licence"] == "MIT"
    assert out["scripts"] == ["promptmesh.backend.cli:main"]
    assert (venv / "bin" / "promptmesh").is_file() or (venv / "Scripts" / "promptmesh.exe").is_file()
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
