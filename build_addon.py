"""Build the Blender extension zips: `python build_addon.py [--out dist] [--platform linux-x64]`.

Each zip holds the add-on (addon/), a vendored copy of shared/ and the unmodified PyPI wheels
of pyzmq and msgpack that addon/blender_manifest.toml lists for that platform, like
`blender --command extension build --split-platforms`. The wheels are fetched once with
`pip download --only-binary=:all:` into a cache (.cache/wheels, or $PROMPTMESH_WHEEL_CACHE).
The manifest is checked first and every listed wheel must exist before anything is packed.

Licences: the add-on's GPL-3.0 text (addon/LICENSE) goes to the zip root as LICENSE, the
vendored shared/ keeps its MIT licence (the root LICENSE) as shared/LICENSE, and each wheel
carries its own licence files in its .dist-info.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "addon"
SHARED = ROOT / "shared"
# (file, name in the zip): the add-on is GPL-3.0-or-later; shared/ is MIT, like the rest of the repository.
LICENSES = ((ADDON / "LICENSE", "LICENSE"), (ROOT / "LICENSE", "shared/LICENSE"))
MANIFEST = "blender_manifest.toml"
# Blender platform name -> the wheel platform tags that run there.
PLATFORMS = {
    "linux-x64": ("manylinux", "x86_64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx", "arm64|universal2"),
}
REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "license",
            "blender_version_min")
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


class BuildError(RuntimeError):
    """The manifest or a wheel is not right; the message says what to fix."""


def check_manifest(manifest: dict) -> None:
    """The checks Blender's own `extension validate` makes that matter to us."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BuildError(f"{MANIFEST}: missing {', '.join(missing)}")
    if manifest["schema_version"] != "1.0.0":
        raise BuildError(f"{MANIFEST}: schema_version must be 1.0.0")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", manifest["id"]):
        raise BuildError(f"{MANIFEST}: id {manifest['id']!r} must be lower case letters, digits and _")
    if not re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"]):
        raise BuildError(f"{MANIFEST}: version {manifest['version']!r} is not semantic (X.Y.Z)")
    if manifest["type"] != "add-on":
        raise BuildError(f"{MANIFEST}: type must be add-on")
    tagline = manifest["tagline"]
    if len(tagline) > 64 or tagline[-1:] in ".!?":
        raise BuildError(f"{MANIFEST}: tagline must be at most 64 characters and not end in punctuation")
    if tuple(int(x) for x in manifest["blender_version_min"].split(".")) < (4, 2, 0):
        raise BuildError(f"{MANIFEST}: blender_version_min must be 4.2.0 or later (extensions)")
    if not all(str(lic).startswith("SPDX:") for lic in manifest["license"]):
        raise BuildError(f"{MANIFEST}: licenses are written SPDX:<id>")
    reason = manifest.get("permissions", {}).get("network")
    if not isinstance(reason, str) or not reason or reason.endswith("."):
        raise BuildError(f"{MANIFEST}: [permissions] network needs a reason (no trailing period)")
    for wheel in manifest.get("wheels", []):
        if not wheel.startswith("./wheels/") or not WHEEL_NAME.match(Path(wheel).name):
            raise BuildError(f"{MANIFEST}: {wheel!r} is not ./wheels/<wheel file name>")


def wheel_name(filename: str) -> re.Match[str]:
    """The parts of a wheel file name (name, version, py, abi, plat)."""
    m = WHEEL_NAME.match(filename)
    if m is None:
        raise BuildError(f"{filename} is not a wheel file name")
    return m


def wheel_platform(filename: str) -> str:
    """The Blender platform a wheel file is for."""
    plat = wheel_name(filename)["plat"]
    for name, needles in PLATFORMS.items():
        if all(re.search(n, plat) for n in needles):
            return name
    raise BuildError(f"wheel {filename} is for no platform we ship ({plat})")


def fetch_wheel(filename: str, cache: Path) -> Path:
    """The wheel from the cache, or downloaded unmodified from the package index."""
    path = cache / filename
    if path.is_file():
        return path
    m = wheel_name(filename)
    py = m["py"].removeprefix("cp")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(cache), "--implementation", "cp", "--python-version", f"{py[0]}.{py[1:]}",
           "--abi", m["abi"], f"{m['name']}=={m['version']}"]
    for tag in m["plat"].split("."):
        cmd += ["--platform", tag]
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"could not download {filename} ({last}). Offline? Put the wheel into {cache} "
                         "by hand, or run once with access to PyPI.")
    return path


def platform_manifest(text: str, platform: str, wheels: list[str]) -> str:
    """The manifest text for one platform: only its wheels, and `platforms` naming it."""
    listed = "".join(f'  "{w}",\n' for w in wheels)
    text, n = re.subn(r"(?ms)^wheels = \[.*?^\]\n", f"wheels = [\n{listed}]\nplatforms = [\"{platform}\"]\n", text)
    if n != 1:
        raise BuildError(f"{MANIFEST}: expected one `wheels = [...]` block ending in a line `]`")
    return text


def source_files() -> list[tuple[Path, str]]:
    """(file, name in the zip) for the add-on and the vendored shared package, with their licences."""
    files = list(LICENSES)
    files += [(p, p.relative_to(ADDON).as_posix()) for p in sorted(ADDON.rglob("*.py"))]
    files += [(p, "shared/" + p.relative_to(SHARED).as_posix()) for p in sorted(SHARED.rglob("*.py"))]
    return [(p, name) for p, name in files if "__pycache__" not in name]


def build(out: Path, platforms: list[str] | None = None, cache: Path | None = None) -> list[Path]:
    """Write one zip per platform under `out`; returns their paths."""
    cache = cache or Path(os.environ.get("PROMPTMESH_WHEEL_CACHE", ROOT / ".cache" / "wheels"))
    text = (ADDON / MANIFEST).read_text()
    manifest = tomllib.loads(text)
    check_manifest(manifest)
    missing = [p.relative_to(ROOT).as_posix() for p, _ in LICENSES if not p.is_file()]
    if missing:
        raise BuildError(f"licence file missing: {', '.join(missing)}")
    wheels = {w: fetch_wheel(Path(w).name, cache) for w in manifest.get("wheels", [])}
    out.mkdir(parents=True, exist_ok=True)
    zips = []
    for platform in platforms or list(PLATFORMS):
        if platform not in PLATFORMS:
            raise BuildError(f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}")
        mine = [w for w in wheels if wheel_platform(Path(w).name) == platform]
        target = out / f"{manifest['id']}-{manifest['version']}-{platform.replace('-', '_')}.zip"
        tmp = target.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, platform_manifest(text, platform, mine))
            for path, name in source_files():
                zf.write(path, name)
            for wheel in mine:
                zf.write(wheels[wheel], wheel.removeprefix("./"), compress_type=zipfile.ZIP_STORED)
        tmp.replace(target)
        zips.append(target)
    return zips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"), help="folder for the zips (default dist/)")
    parser.add_argument("--platform", action="append", choices=list(PLATFORMS), help="only this platform (repeatable)")
    args = parser.parse_args(argv)
    try:
        for path in build(Path(args.out), args.platform):
            print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    except BuildError as exc:
        print(f"build_addon: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
