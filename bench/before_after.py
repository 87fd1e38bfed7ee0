"""Run one benchmark against an older commit and against the working tree, side by side on this
machine, and print both figures and their ratio.

    python bench/before_after.py REV [--rounds 2] -- SCRIPT [ARGS ...]
    python bench/before_after.py main -- bench/sds_speed.py --model embedded --resolution 32

The older commit is checked out into a temporary git worktree. The benchmark script is always
the working tree's; only the code it imports (`promptmesh.backend`, `promptmesh.shared`) comes
from each side, through a `promptmesh` package of symlinks first on PYTHONPATH. Rounds
alternate before/after so that drift of the machine lands on both. Each script reports with
`figures.report`, lines of the form `figure: NAME = VALUE UNIT`; a figure's value is the median
over the rounds. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^figure: (?P<name>\S+) = (?P<value>[-+0-9.eE]+) (?P<unit>.*)$")


def shim(folder: Path, source: Path) -> Path:
    """A `promptmesh` package in `folder` whose backend/ and shared/ are `source`'s."""
    package = folder / "promptmesh"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("backend", "shared"):
        (package / name).symlink_to(source / name, target_is_directory=True)
    return folder


def run_side(path: Path, script: list[str], label: str) -> dict[str, tuple[float, str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, *script], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{label}: {' '.join(script)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    figures = {}
    for line in proc.stdout.splitlines():
        match = FIGURE.match(line)
        if match:
            figures[match["name"]] = (float(match["value"]), match["unit"])
    if not figures:
        sys.exit(f"{label}: {' '.join(script)} printed no `figure:` lines:\n{proc.stdout[-3000:]}")
    print(f"  {label}: " + ", ".join(f"{k} {v:g}" for k, (v, _) in figures.items()), flush=True)
    return figures


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: before_after.py REV [--rounds N] -- SCRIPT [ARGS ...]")
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("rev", help="the older commit (anything `git rev-parse` takes)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv[:cut])
    script = argv[cut + 1:]
    commit = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "backend", "shared"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="pm-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
        try:
            sides = {"before": shim(Path(tmp) / "before", tree), "after": shim(Path(tmp) / "after", ROOT)}
            runs: dict[str, list[dict[str, tuple[float, str]]]] = {"before": [], "after": []}
            print(f"{' '.join(script)}: before = {commit}, after = working tree ({head}{' + changes' if dirty else ''})")
            for r in range(args.rounds):
                for label, path in sides.items():
                    runs[label].append(run_side(path, script, f"round {r + 1} {label}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print(f"\n{'figure':<28} {'before':>12} {'after':>12} {'after/before':>13}")
    for name, (_, unit) in runs["after"][0].items():
        after = statistics.median(f[name][0] for f in runs["after"])
        if name not in runs["before"][0]:
            print(f"{name:<28} {'-':>12} {after:>12.4g} {'':>13} {unit}")
            continue
        before = statistics.median(f[name][0] for f in runs["before"])
        ratio = f"{after / before:.3f}" if before else "-"
        print(f"{name:<28} {before:>12.4g} {after:>12.4g} {ratio:>13} {unit}")


if __name__ == "__main__":
    main()
