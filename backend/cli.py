"""The `promptmesh` command: generate meshes, and train or sample the embedded prior."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from shared.spec import LIMITS, JobSpec, SpecError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error for the user: printed as one line, no traceback."""


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers
    import diffusers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "mesh"


def output_path(out: str | None, fmt: str | None, prompt: str) -> tuple[Path, str]:
    """The output file and its format; refuses unknown formats and unwritable folders now,
    before minutes of optimisation, rather than after."""
    from backend.export import FORMATS

    path = Path(out) if out else Path(f"{slug(prompt)}.{fmt or 'glb'}")
    suffix = path.suffix.lstrip(".").lower()
    fmt = (fmt or suffix or "glb").lower()
    if fmt not in FORMATS:
        raise CliError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)} (FBX: `promptmesh export`)")
    if suffix != fmt:
        path = path.with_name(path.name + f".{fmt}") if suffix not in FORMATS else path.with_suffix(f".{fmt}")
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise CliError(f"cannot write {path}: the folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise CliError(f"cannot write {path}: the folder {folder} is not writable ({exc.strerror})") from None
    if path.is_dir():
        raise CliError(f"cannot write {path}: it is a folder")
    return path, fmt


def cmd_generate(args: argparse.Namespace) -> int:
    if args.model is None:
        print("using the embedded prior (pass --model stabilityai/stable-diffusion-2-1-base for Stable Diffusion)", file=sys.stderr)
    spec = JobSpec(
        prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps, resolution=args.resolution,
        guidance_scale=args.guidance_scale, model=args.model or "embedded", preview_every=args.preview_every,
        mesh_resolution=args.mesh_resolution, max_faces=args.max_faces, device=args.device,
    ).validate()
    out, fmt = output_path(args.output, args.format, spec.prompt)
    preview_dir = Path(args.preview_dir) if args.preview_dir else None
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
        spec.preview_every = spec.preview_every or 50

    _quiet_libraries()
    import imageio.v3 as iio
    from tqdm import tqdm

    from backend.export import write_json, write_mesh
    from backend.pipeline import PreviewEvent, StageEvent, StepEvent, run

    bar: tqdm | None = None

    def on_event(event: object) -> None:
        nonlocal bar
        if isinstance(event, StageEvent) and event.stage in ("loading", "meshing"):
            print(f"{event.stage}...", file=sys.stderr)
        elif isinstance(event, StepEvent):
            if bar is None:
                bar = tqdm(total=event.total, initial=event.step - 1, desc="optimising", unit="it", dynamic_ncols=True)
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
            if event.step == event.total:
                bar.close()
        elif isinstance(event, PreviewEvent) and preview_dir is not None:
            iio.imwrite(preview_dir / f"step_{event.step:05d}.png", event.rgba)

    checkpoint = out.with_name(out.stem + ".ckpt.pt")
    result = run(spec, on_event, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume)
    write_mesh(result.mesh, out, fmt)
    meta = {**result.metadata, "file": out.name, "format": fmt}
    if args.video:
        from backend.video import write_turntable

        video = write_turntable(result.trainer, out.with_suffix(".mp4"))
        meta["video"] = video.name
    write_json(meta, out.with_suffix(".json"))
    t = meta["timings"]
    print(f"wrote {out} ({meta['vertices']} vertices, {meta['faces']} faces) in {t['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def cmd_prior_train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from backend.prior.train import TrainConfig, train

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, dataset_size=args.dataset_size, seed=args.seed)
    train(Path(args.out), config, resume=args.resume)
    print(f"weights in {Path(args.out) / 'prior'}; copy that folder to backend/prior/weights to ship it", file=sys.stderr)
    return 0


def cmd_prior_sample(args: argparse.Namespace) -> int:
    _quiet_libraries()
    import imageio.v3 as iio

    from backend.guidance.loading import EMBEDDED
    from backend.prior import WEIGHTS_DIR
    from backend.prior.model import EmbeddedPrior
    from backend.prior.sample import sample_grid

    prior = EmbeddedPrior.from_pretrained(WEIGHTS_DIR if args.model == EMBEDDED else args.model)
    grid = sample_grid(prior, " ".join(args.prompt.split()), views=args.views, rows=args.rows,
                       guidance_scale=args.guidance_scale, steps=args.steps, seed=args.seed)
    iio.imwrite(args.output, grid)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _int_in(name: str):
    lo, hi = LIMITS[name]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="promptmesh", description="Text to 3D mesh by Score Distillation Sampling.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="optimise a NeRF for a prompt and write a vertex-coloured mesh")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", help="output file (default: the prompt's words .glb)")
    g.add_argument("--format", choices=("glb", "ply", "obj"), help="file format (default: from -o, else glb)")
    g.add_argument("--model", help="'embedded' (default), a Hub id such as stabilityai/stable-diffusion-2-1-base, or a folder")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=_int_in("steps"), help="optimisation steps (default: the model's)")
    g.add_argument("--seed", type=_int_in("seed"), default=0)
    g.add_argument("--resolution", type=_int_in("resolution"), help="render size in pixels, a multiple of 8")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--preview-dir", help="write a preview PNG every --preview-every steps here")
    g.add_argument("--preview-every", type=_int_in("preview_every"), default=0)
    g.add_argument("--mesh-resolution", type=_int_in("mesh_resolution"), default=128, help="marching cubes grid (32..256)")
    g.add_argument("--max-faces", type=_int_in("max_faces"), help="decimate the mesh to at most this many faces")
    g.add_argument("--video", action="store_true", help="also write a turntable MP4 of the final NeRF")
    g.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (OUT.ckpt.pt)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint beside the output")
    g.set_defaults(func=cmd_generate)

    prior = sub.add_parser("prior", help="train or sample the embedded prior").add_subparsers(dest="prior_command", required=True, parser_class=Parser)
    t = prior.add_parser("train", help="train the embedded prior from scratch (CPU is fine; hours)")
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--dataset-size", type=int, default=40000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/prior")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_prior_train)
    s = prior.add_parser("sample", help="draw 2D samples around the object to see what the prior knows")
    s.add_argument("prompt")
    s.add_argument("-o", "--output", default="samples.png")
    s.add_argument("--model", default="embedded", help="'embedded' or a folder written by `prior train`")
    s.add_argument("--views", type=int, default=8)
    s.add_argument("--rows", type=int, default=2)
    s.add_argument("--guidance-scale", type=float, default=3.0)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_prior_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from backend.guidance.base import ModelLoadError
    from backend.mesh import MeshError
    from backend.pipeline import Cancelled, DeviceError

    try:
        return args.func(args)
    except (CliError, SpecError, ModelLoadError, DeviceError, MeshError, Cancelled) as exc:
        print(f"promptmesh: error: {exc}", file=sys.stderr)
    except ValueError as exc:  # e.g. words the embedded prior does not know, a foreign checkpoint
        print(f"promptmesh: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"promptmesh: error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
    except KeyboardInterrupt:
        print("promptmesh: interrupted (run again with --resume to continue from the last checkpoint)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
