"""bench/before_after.py: each side really imports its own code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import sys
from pathlib import Path
sys.path.insert(0, str(Path({root!r}) / "bench"))
import promptmesh.backend, promptmesh.shared
from figures import report
here = Path({root!r}).resolve()
for name, module in (("backend_here", promptmesh.backend), ("shared_here", promptmesh.shared)):
    report(name, float(Path(module.__file__).resolve().is_relative_to(here)), "bool")
report("marker", float(Path(promptmesh.backend.__file__).resolve().parent.joinpath({marker!r}).exists()), "bool")
'''


def test_before_runs_the_older_commit_and_after_the_working_tree(tmp_path):
    marker = "_before_after_probe.txt"  # untracked: only the working tree has it
    (ROOT / "backend" / marker).write_text("")
    try:
        script = tmp_path / "probe.py"
        script.write_text(PROBE.format(root=str(ROOT), marker=marker))
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "before_after.py"), "HEAD", "--rounds", "1",
                               "--", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        (ROOT / "backend" / marker).unlink()
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in proc.stdout.splitlines()
            if line.startswith(("backend_", "shared_", "marker"))}
    assert rows == {"backend_here": ["0", "1"], "shared_here": ["0", "1"], "marker": ["0", "1"]}, proc.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "pm-before-" not in worktrees  # the temporary worktree is gone
