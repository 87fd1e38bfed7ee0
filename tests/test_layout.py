"""What the layout promises, checked mechanically: the layers import only downwards (the order
README.md's Layout section gives), and the add-on and shared/ stay free of the backend."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module may import from its own layer and the ones below it. Names are module
# paths under the import namespace `promptmesh`; a name covers a package's modules too, unless
# it ends in "=".
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shared", ("shared",)),
    ("maths", ("backend.background", "backend.cameras", "backend.dmtet", "backend.export", "backend.field",
               "backend.framing", "backend.mesh", "backend.models", "backend.multiview", "backend.mvdream", "backend.process",
               "backend.prompts", "backend.raster", "backend.recipe", "backend.renderer", "backend.shading",
               "backend.texture", "backend.threads", "backend.trilinear",
               "backend=")),  # `backend=`: that module alone (its version)
    ("prior", ("backend.prior",)),
    ("guidance", ("backend.guidance",)),
    ("generation", ("backend.stages", "backend.pipeline", "backend.video")),
    ("serving", ("backend.server", "backend.executor", "backend.executors", "backend.ray_executor", "backend.registry",
                 "backend.keys")),
    ("cli", ("backend.cli",)),
]


def layer_of(module: str) -> int:
    """The layer of a module path like 'backend.stages.loop' (the longest matching prefix wins)."""
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix.endswith("=")
            prefix = prefix.rstrip("=")
            if (module == prefix or (not exact and module.startswith(prefix + "."))) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and to README.md's Layout")
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """The project modules `path` imports, as module paths (relative imports resolved; the
    `promptmesh.` namespace dropped); imports of other packages are left out."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("promptmesh."):
                target = node.module.removeprefix("promptmesh.")
            else:
                continue
            names = [f"{target}.{a.name}" for a in node.names]  # `from . import x` imports a module x
            found.append(next((n for n in names if (ROOT / n.replace(".", "/")).with_suffix(".py").exists()
                               or (ROOT / n.replace(".", "/")).is_dir()), target))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("promptmesh.") for a in node.names if a.name.startswith("promptmesh.")]
    return found


SOURCES = sorted([*ROOT.glob("backend/**/*.py"), *ROOT.glob("shared/*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_from_its_own_layer_or_below(path: Path):
    mine = layer_of(module_name(path))
    upward = [name for name in imports(path) if layer_of(name) > mine]
    assert not upward, f"{module_name(path)} ({LAYERS[mine][0]}) imports upward: {upward}"


def test_shared_and_the_addon_import_no_torch_and_no_backend():
    for path in [*ROOT.glob("shared/*.py"), *ROOT.glob("addon/*.py")]:
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        names += [f"{'.' * n.level}{n.module or ''}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        bad = [n for n in names if n.split(".")[0] in ("torch", "diffusers", "transformers") or "backend" in n]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# The words of shared/vocab.py a comparison must name by member. Device is left out: torch's
# device types are the same strings and belong to torch; in the add-on, ErrorCode's words are also
# Blender's own identifiers (an object's type 'MESH', an operator's {'CANCELLED'}, its job states).
CHECKED = ("JobState", "Stage", "ErrorCode", "OutputFormat", "ViewPrompt", "Quality", "MessageType")


def bare_words(path: Path) -> list[str]:
    """'line: word -> Enum.MEMBER' for every string constant in a comparison (==, !=, in) that is
    one of the vocabulary's values."""
    from promptmesh.shared import vocab

    enums = [getattr(vocab, name) for name in CHECKED if not (name == "ErrorCode" and path.parts[-2] == "addon")]
    words = {m.value: f"{e.__name__}.{m.name}" for e in enums for m in e}

    def constants(node: ast.AST) -> list[ast.Constant]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [c for e in node.elts for c in constants(e)]
        return []

    return [f"{c.lineno}: {c.value!r} -> {words[c.value]}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Compare) for side in (node.left, *node.comparators) for c in constants(side)
            if c.value in words]


PRODUCTION = sorted(p for p in [*SOURCES, *ROOT.glob("addon/*.py")] if p.name != "vocab.py")


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_vocabulary_word_is_compared_as_a_bare_string(path: Path):
    assert not bare_words(path), f"{path.relative_to(ROOT)} spells vocabulary as strings: {bare_words(path)}"


def test_the_bare_word_check_sees_one(tmp_path: Path):
    sample = tmp_path / "backend" / "sample.py"
    sample.parent.mkdir()
    sample.write_text('if state in ("queued", "elsewhere") or msg.type == "done":\n    pass\n')
    assert bare_words(sample) == ["1: 'queued' -> JobState.QUEUED", "1: 'done' -> MessageType.DONE"]


def test_the_layer_checker_sees_an_upward_import(tmp_path: Path):
    """The check above can fail: a prior module importing the guidance is caught."""
    assert layer_of("backend.guidance.embedded") > layer_of("backend.prior.train")
    assert layer_of("backend.stages.loop") > layer_of("backend.recipe") > layer_of("shared.vocab")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("backend.somewhere_new")


def test_no_tracked_path_is_a_symbolic_link():
    """A clone must stand alone: a committed link (say .ci/node -> a developer's checkout) points
    at nothing, or at itself, on CI's fresh machine, and npm then fails on it before any test."""
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000 ")]
    assert links == [], f"tracked symbolic links: {links}"
