"""Wall time of `promptmesh generate`, from process start to the file written, and its peak RSS.

    python bench/generate_time.py [--prompts "a yellow cone;a red cube"] [-- EXTRA GENERATE ARGS]

Each prompt runs in a fresh process (as a user runs it), seed 0, the embedded default unless
the extra arguments say otherwise. Prints one line per prompt and the figures `generate`
(mean seconds) and `peak_rss` (the largest, MB). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import report

CLI = "import sys; from promptmesh.backend.cli import main; sys.argv[0] = 'promptmesh'; sys.exit(main())"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", default="a yellow cone", help="prompts separated by ';'")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(args.prompts.split(";")):
            out = Path(tmp) / f"{i}.glb"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", CLI, "generate", prompt, "-o", str(out), "--seed", "0", *extra],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
            times.append(time.perf_counter() - t0)
            # ru_maxrss of children is the largest of any child so far, in kB on Linux.
            peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
            if not out.is_file():
                sys.exit(f"{prompt!r}: no {out.name} written")
            print(f"{prompt!r}: {times[-1]:.1f} s", flush=True)
    report("generate", sum(times) / len(times), "s")
    report("peak_rss", max(peaks), "MB")


if __name__ == "__main__":
    main()
