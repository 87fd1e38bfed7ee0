"""The `promptmesh` command: generate meshes, and train or sample the embedded prior."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..shared.errors import PromptMeshError
from ..shared.spec import TEXTURE_SIZES, JobSpec
from ..shared.surface import MAX_FACES
from ..shared.vocab import (
    MESH_FORMATS,
    Device,
    ErrorCode,
    JobState,
    MessageType,
    Objective,
    OutputFormat,
    Quality,
    Stage,
    ViewPrompt,
)
from .models import EMBEDDED

if TYPE_CHECKING:
    from ..shared.image import Reference
    from .stages import Surface

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
WAITS = (Stage.LOADING, Stage.DOWNLOADING, Stage.MESHING)  # stages without steps: named when they start


class CliError(PromptMeshError):
    """A usage error found by the CLI itself (a bad output path, a missing file)."""

    code = ErrorCode.BAD_REQUEST


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "mesh"


def output_path(out: str | None, fmt: str | None, prompt: str, formats: tuple[str, ...] | None = None) -> tuple[Path, str]:
    """The output file and its format; refuses unknown formats and unwritable folders now,
    before minutes of optimisation, rather than after."""
    from .export import FORMATS

    formats = formats or FORMATS
    path = Path(out) if out else Path(f"{slug(prompt)}.{fmt or OutputFormat.GLB}")
    suffix = path.suffix.lstrip(".").lower()
    fmt = (fmt or suffix or OutputFormat.GLB).lower()
    if fmt not in formats:
        raise CliError(f"unknown output format {fmt!r}: use one of {', '.join(formats)}"
                       + ("" if OutputFormat.FBX in formats else " (FBX: `promptmesh export`)"))
    if suffix != fmt:
        path = path.with_name(path.name + f".{fmt}") if suffix not in formats else path.with_suffix(f".{fmt}")
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


def _spec(args: argparse.Namespace) -> JobSpec:
    """The job spec of the options: the backend applies the model's quality preset, then what
    was given explicitly (an option left out is None: not given). An image job's prompt may be
    empty."""
    return JobSpec(
        prompt=args.prompt, negative=args.negative, seed=args.seed, guidance_scale=args.guidance_scale,
        model=args.model or EMBEDDED, quality=args.quality, steps=args.steps, resolution=args.resolution,
        mesh_resolution=args.mesh_resolution, refine_steps=args.refine_steps,
        preview_every=args.preview_every, max_faces=args.max_faces, device=args.device, view_prompt=args.view_prompt,
        texture_size=args.texture_size, objective=args.objective, novel_view=getattr(args, "novel_view", None),
        proxy_every=args.proxy_every if getattr(args, "proxy_dir", None) else 0.0,  # proxies only for someone to see
    ).validate(image=bool(getattr(args, "image", None)))


def _reference(args: argparse.Namespace) -> Reference | None:
    """The image job's checked image and reference camera (None: a text job); the options that
    only an image job takes are refused without --image."""
    from ..shared.image import Reference, check_camera, read_image

    if not getattr(args, "image", None):
        for flag in ("mask", "elevation", "fov", "novel_view"):
            if getattr(args, flag, None) is not None:
                raise CliError(f"--{flag.replace('_', '-')} belongs to an image job: give --image too")
        return None
    elevation, fov = check_camera(0.0 if args.elevation is None else args.elevation, args.fov)
    return Reference(read_image(args.image, args.mask), elevation, fov)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.model is None:
        print("using the embedded prior (pass --model sd21 for Stable Diffusion 2.1)",
              file=sys.stderr)
    reference = _reference(args)
    spec = _spec(args)
    _say_image_job_warnings(reference, spec)
    name = spec.prompt or (Path(args.image).stem if reference is not None else "")
    out, fmt = output_path(args.output, args.format, name)
    return _run_and_write(args, spec, out, fmt, reference=reference)


def _say_image_job_warnings(reference: Reference | None, spec: JobSpec) -> None:
    """An image job's notes, said before it runs or is sent (the result keeps them too)."""
    if reference is not None:
        from ..shared.image import image_job_warnings

        for warning in image_job_warnings(spec.prompt, spec.novel_view):
            print(f"note: {warning}", file=sys.stderr)


def cmd_texture(args: argparse.Namespace) -> int:
    """Paint a given mesh from a prompt: its geometry, place and size stay as they are."""
    from .export import read_surface
    from .stages import Surface

    surface = Surface.checked(*read_surface(args.mesh))
    spec = _spec(args)
    out, fmt = output_path(args.output, args.format, f"{Path(args.mesh).stem} {spec.prompt}")
    for warning in surface.warnings:
        print(f"note: {warning}", file=sys.stderr)
    return _run_and_write(args, spec, out, fmt, surface)


def _run_and_write(args: argparse.Namespace, spec: JobSpec, out: Path, fmt: str, surface: Surface | None = None,
                   reference: Reference | None = None) -> int:
    """Run the job with a progress bar (previews and a checkpoint beside `out`) and write the mesh
    and its sidecar JSON."""
    from .process import prepare_process

    prepare_process()
    preview_dir = Path(args.preview_dir) if args.preview_dir else None
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
        spec.preview_every = spec.preview_every or 50

    _quiet_libraries()
    import imageio.v3 as iio
    from tqdm import tqdm

    from ..shared.result import atomic_target, write_json
    from .export import write_mesh
    from .pipeline import PreviewEvent, StageEvent, StepEvent, run

    bar: tqdm | None = None
    fetched: tqdm | None = None

    def on_event(event: object) -> None:
        nonlocal bar, fetched
        if isinstance(event, StageEvent) and (event.stage in WAITS and not event.total):
            print(f"{event.stage}...", file=sys.stderr)
        elif isinstance(event, StageEvent) and event.stage == Stage.DOWNLOADING:
            if fetched is None:
                fetched = tqdm(total=event.total, desc="downloading", unit="B", unit_scale=True, dynamic_ncols=True)
            fetched.total = event.total
            fetched.update(event.done - fetched.n)
            if event.done >= event.total:
                fetched.close()
        elif isinstance(event, StepEvent):
            if bar is None:
                bar = tqdm(total=event.total, initial=event.step - 1, desc=event.stage, unit="it", dynamic_ncols=True)
            bar.set_description(event.stage, refresh=False)
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
            if event.step == event.total:
                bar.close()
        elif isinstance(event, PreviewEvent) and preview_dir is not None:
            with atomic_target(preview_dir / f"step_{event.step:05d}.png") as tmp:
                iio.imwrite(tmp, event.rgba)

    checkpoint = out.with_name(out.stem + ".ckpt.pt")
    result = run(spec, on_event, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                 threads=args.threads, surface=surface, reference=reference)
    write_mesh(result.mesh, out, fmt)
    meta = {**result.metadata, "file": out.name, "format": fmt}
    if getattr(args, "video", False) and result.nerf is not None:
        from .video import write_turntable

        video = write_turntable(result.nerf, out.with_suffix(".mp4"))
        meta["video"] = video.name
    write_json(meta, out.with_suffix(".json"))
    t = meta["timings"]
    print(f"wrote {out} ({meta['vertices']} vertices, {meta['faces']} faces) in {t['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def cmd_prior_train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .prior import WEIGHTS_DIR
    from .prior.data import ViewBias
    from .prior.train import TrainConfig, train
    from .threads import resolve_device

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ViewBias)}  # a flag for each
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, dataset_size=args.dataset_size, seed=args.seed,
                         lr=args.lr, warmup=args.warmup, views=4 if args.multiview else 1,
                         single_view_share=args.single_view_share, empty_caption_rate=args.empty_caption_rate,
                         init=str(WEIGHTS_DIR) if args.init == EMBEDDED else args.init,
                         bias=ViewBias(**{k: v for k, v in given.items() if v is not None}))
    train(Path(args.out), config, resume=args.resume, device=resolve_device(args.device))
    print(f"weights in {Path(args.out) / 'prior'}; copy that folder to backend/prior/weights to ship it", file=sys.stderr)
    return 0


def cmd_prior_train_views(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .prior import WEIGHTS_DIR
    from .prior.views import ViewsConfig, train_views

    given = {"steps": args.steps, "batch_size": args.batch_size, "references": args.references, "lr": args.lr,
             "seed": args.seed}  # left out: ViewsConfig's defaults
    config = ViewsConfig(**{k: v for k, v in given.items() if v is not None},
                         init=str(WEIGHTS_DIR) if args.init == EMBEDDED else args.init)
    train_views(Path(args.out), config, resume=args.resume)
    print(f"a novel-view prior in {Path(args.out) / 'prior'}: `generate --image IMG --novel-view` that folder",
          file=sys.stderr)
    return 0


def cmd_prior_sample(args: argparse.Namespace) -> int:
    _quiet_libraries()
    import imageio.v3 as iio

    from ..shared.result import atomic_target
    from .prior import WEIGHTS_DIR
    from .prior.model import EmbeddedPrior
    from .prior.sample import GUIDANCE, sample_grid

    prior = EmbeddedPrior.from_pretrained(WEIGHTS_DIR if args.model == EMBEDDED else args.model)
    if args.cameras % prior.views_per_group:
        raise PromptMeshError(f"{args.model} is a multi-view prior: --cameras must be a multiple of {prior.views_per_group}",
                              ErrorCode.BAD_REQUEST)
    grid = sample_grid(prior, " ".join(args.prompt.split()), views=args.cameras, rows=args.rows,
                       guidance_scale=GUIDANCE if args.guidance_scale is None else args.guidance_scale,
                       steps=args.steps, seed=args.seed)
    with atomic_target(args.output) as tmp:
        iio.imwrite(tmp, grid)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    _quiet_libraries()
    from .executors import Executor, InProcessExecutor
    from .models import Offer
    from .server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    executor: Executor
    if args.executor == "ray":
        from .executors.ray_relay import RayExecutor

        executor = RayExecutor(args.ray_address, gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                               retries=args.retries, device=args.device, log_dir=Path(args.data_dir))
    else:
        executor = InProcessExecutor(args.device, threads=args.threads)
    server = Server(args.bind, Path(args.data_dir), executor=executor, curve_dir=Path(args.keys) if args.keys else None,
                    max_queue=args.max_queue, max_queue_per_client=args.max_queue_per_client,
                    offer=Offer(Path(args.models_dir) if args.models_dir else None, tuple(args.allow_model)),
                    max_texture_faces=args.max_texture_faces)
    print(f"promptmesh serving on {server.endpoint} (data in {args.data_dir})", file=sys.stderr, flush=True)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does: cleanly

    # SIGINT too: Python raises KeyboardInterrupt only where SIGINT was not ignored at start-up, and
    # a parent can leave it ignored (a shell's background job; a test process after Blender ran).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from .keys import generate

    public, secret = generate(Path(args.folder), args.name, force=args.force)
    print(f"wrote {public} (share it) and {secret} (keep it private)", file=sys.stderr)
    return 0


def _client(args: argparse.Namespace):
    from ..shared.client import Client

    server_key = client_keys = None
    if args.server_key:
        from .keys import load_public, load_secret_pair

        server_key = load_public(args.server_key)
        if args.client_key:
            client_keys = load_secret_pair(args.client_key)
    client = Client(args.endpoint, server_key=server_key, client_keys=client_keys)
    try:
        client.hello(timeout=args.timeout)
    except Exception:
        client.close()
        raise
    return client


def _write_result(message, out: Path) -> Path:
    from ..shared.result import Mesh, write_json
    from .export import write_mesh

    mesh = Mesh.from_arrays(message.arrays)
    out_path, fmt = output_path(str(out), None, "mesh")
    write_mesh(mesh, out_path, fmt)
    write_json(message.fields.get("meta") or {}, out_path.with_suffix(".json"))
    return out_path


def cmd_submit(args: argparse.Namespace) -> int:
    reference = _reference(args)
    spec = _spec(args)
    kind, arrays, fields = MessageType.GENERATE, None, {}
    if reference is not None:  # an image job: the image travels with it, checked here first as the server will
        if args.mesh:
            raise CliError("a job paints --mesh or makes an object from --image, not both")
        kind, arrays = MessageType.IMAGE, {"image": reference.rgba}
        fields = {"elevation": reference.elevation, **({} if reference.fov is None else {"fov": reference.fov})}
        _say_image_job_warnings(reference, spec)
    if args.mesh:  # a texture job: the mesh travels with it, checked here first as the server will
        from ..shared.surface import check_surface
        from .export import read_surface

        vertices, faces, uvs, warnings = check_surface(*read_surface(args.mesh))
        kind, arrays = MessageType.TEXTURE, {"vertices": vertices, "faces": faces, **({} if uvs is None else {"uvs": uvs})}
        for warning in warnings:
            print(f"note: {warning}", file=sys.stderr)
    if args.output:
        output_path(args.output, None, spec.prompt)
    if args.proxy_dir:
        if not args.wait:
            raise CliError("--proxy-dir needs --wait: the proxies arrive while the job runs")
        Path(args.proxy_dir).mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        accepted = client.request(kind, spec=spec.to_dict(), timeout=args.timeout, arrays=arrays, **fields)
        job = accepted.job
        print(job)
        if not args.wait:
            return 0
        _wait_for_job(client, job, args)
        if args.output:
            path = _write_result(client.request(MessageType.RESULT, job, timeout=60), Path(args.output))
            print(f"wrote {path}", file=sys.stderr)
        return 0


def _write_proxy(msg, folder: Path) -> Path:
    """A `proxy` message as a PLY file (Z up, sRGB vertex colours, like `generate -o x.ply`)."""
    import trimesh

    from ..shared.result import atomic_write

    arrays = msg.arrays
    mesh = trimesh.Trimesh(arrays["vertices"].astype("float32"), arrays["faces"], vertex_colors=arrays["colors"],
                           process=False)
    return atomic_write(folder / f"proxy_{int(msg.fields.get('step', 0)):05d}.ply",
                        lambda f: mesh.export(f, file_type=OutputFormat.PLY))


def _wait_for_job(client, job: str, args: argparse.Namespace, resync_s: float = 30.0) -> None:
    """Show the job's progress until it ends; CliError if it failed or was cancelled. The client
    watches the job again after any reconnection, so its end arrives as an event; after
    `resync_s` seconds without a word of it, `status` is asked as well."""
    import time

    from tqdm import tqdm

    from ..shared.vocab import Stage

    def ended(kind: str, code: str | None, message: str) -> None:
        bar.close()
        if kind != MessageType.DONE:
            raise CliError(f"job {job} {'was cancelled' if code == ErrorCode.CANCELLED else 'failed'}: {message}")

    bar = tqdm(desc=f"job {job}", unit="it", dynamic_ncols=True, file=sys.stderr)
    heard = time.monotonic()
    while True:
        for msg in client.poll(1.0):
            if msg.job != job:
                continue
            heard = time.monotonic()
            f = msg.fields
            if msg.type == MessageType.PROXY and args.proxy_dir:
                _write_proxy(msg, Path(args.proxy_dir))
            elif msg.type == MessageType.PROGRESS and f.get("stage") == Stage.DOWNLOADING and f.get("total_bytes"):
                _show(bar, f["done_bytes"], f["total_bytes"], Stage.DOWNLOADING, "B")
            elif msg.type == MessageType.PROGRESS and f.get("total"):
                _show(bar, f["step"], f["total"], f["stage"], "it")
            elif msg.type in (MessageType.DONE, MessageType.ERROR) and not msg.id:
                return ended(msg.type, f.get("code"), f.get("message", ""))
        if time.monotonic() - heard > resync_s:
            (summary,) = client.request(MessageType.STATUS, job, timeout=args.timeout).fields["jobs"]
            heard = time.monotonic()
            if JobState(summary["state"]).final:
                return ended(MessageType.DONE if summary["state"] == JobState.DONE else MessageType.ERROR,
                             summary.get("error_code"), summary.get("error") or "")


def _show(bar, done: int, total: int, stage: str, unit: str) -> None:
    """Move the terminal's bar; bytes while downloading, steps after."""
    if bar.unit != unit:
        bar.unit, bar.unit_scale = unit, unit == "B"
        bar.reset(total)
    bar.total = total
    bar.update(done - bar.n)
    bar.set_postfix(stage=stage, refresh=False)


def printable(text: object) -> str:
    """Text from the wire made safe for a terminal: control and format characters escaped."""
    import unicodedata

    return "".join(ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else ascii(ch)[1:-1] for ch in str(text))


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.prune is not None:
        with _client(args) as client:
            pruned = client.request(MessageType.PRUNE, timeout=max(args.timeout, 60), days=args.prune).fields["jobs"]
        print(f"removed {pruned} job(s) that ended more than {args.prune:g} days ago, with their results",
              file=sys.stderr)
        return 0
    with _client(args) as client:
        reply = client.request(MessageType.STATUS, timeout=args.timeout, limit=args.limit).fields
    jobs = reply["jobs"]
    for j in jobs:
        took = f"{j['finished'] - j['started']:.0f}s" if j.get("finished") and j.get("started") else "-"
        pos = "" if j.get("position") is None else f" #{j['position']}"
        node = f"  [on {printable(j['node'])}]" if j.get("node") else ""
        print(f"{printable(j['job'])}  {printable(j['state']):<9}{pos:<4} {took:>6}  {printable(j['prompt'])}{node}")
    if reply.get("total", len(jobs)) > len(jobs):
        print(f"... {reply['total'] - len(jobs)} older job(s) not shown (--limit N shows up to 500)", file=sys.stderr)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    output_path(args.output, None, "mesh")
    with _client(args) as client:
        path = _write_result(client.request(MessageType.RESULT, args.job, timeout=max(args.timeout, 60)), Path(args.output))
    print(f"wrote {path}", file=sys.stderr)
    return 0


BPY_HINT = ('FBX is written by Blender\'s own exporter through the bpy module, which is not installed: '
            'pip install "bpy==4.5.*" (Python 3.11, numpy<2), or export from Blender with the PromptMesh add-on')


def cmd_export(args: argparse.Namespace) -> int:
    """A job's mesh or a mesh file -> FBX through Blender's exporter (bpy module), or GLB/PLY/OBJ
    through our own writers (the files `generate` makes; no Blender needed)."""
    import json

    from ..shared.result import JOB_ID, JobFiles
    from .export import FORMATS, read_mesh, write_mesh

    source = Path(args.source)
    if source.is_file():
        mesh_path, meta_path = source, source.with_suffix(".json")
    elif JOB_ID.fullmatch(args.source):
        files = JobFiles.of(args.data_dir, args.source)
        mesh_path, meta_path = files.mesh, files.meta
        if not mesh_path.is_file():
            raise CliError(f"no finished job {args.source} in {args.data_dir} (see `promptmesh jobs`)")
    else:
        raise CliError(f"{args.source} is neither a mesh file nor a job id")
    out, fmt = output_path(args.output, args.format, source.stem, (OutputFormat.FBX, *FORMATS))
    mesh = read_mesh(mesh_path)
    if fmt == OutputFormat.FBX:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        export_fbx(mesh, str(meta.get("prompt") or source.stem), out)
    else:
        write_mesh(mesh, out, fmt)
    print(f"wrote {out} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)", file=sys.stderr)
    return 0


def export_fbx(mesh, name: str, out: Path) -> None:
    """FBX for Cinema 4D, written by Blender's own exporter in a fresh, empty scene (a texture
    embedded in the file)."""
    try:
        import bpy
    except ImportError:
        raise CliError(BPY_HINT) from None
    from ..shared.blender_io import create_object, export_objects

    bpy.ops.wm.read_factory_settings(use_empty=True)
    obj = create_object(bpy.context, name[:63], mesh.vertices, mesh.faces, mesh.colors, uvs=mesh.uvs,
                        texture=mesh.texture)
    export_objects(bpy.context, [obj], out, OutputFormat.FBX)


def cmd_models(args: argparse.Namespace) -> int:
    """The catalogue, which models are in the local cache (no network needed), and what each
    quality preset sets, from the model's card."""
    from .guidance.loading import model_card
    from .models import CATALOGUE, cached_repo

    for m in CATALOGUE.values():
        where = cached_repo(m.alias)
        state = "ready" if where == "package" else (f"cached ({where})" if where else "not downloaded")
        print(f"{m.alias:<10} {state:<51} {m.size}\n           {m.description}; licence {m.licence}")
        if m.novel_view:  # no card: an image job's recipe holds its settings
            continue
        for quality, preset in model_card(m.alias).describe().items():
            settings = ", ".join(f"{k} {v}" for k, v in preset["settings"].items()) or "the recipe as it is"
            timed = "; ".join(f"{s:.0f} s on {device}" for device, s in preset["seconds"].items())
            print(f"           {quality:<8} {settings}{f' ({timed})' if timed else ''}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"  # this command is all about its progress
    from .models import download

    if args.model == EMBEDDED:
        print("the embedded prior ships in the package: nothing to download", file=sys.stderr)
        return 0
    repo = download(args.model)
    print(f"{args.model}: downloaded from {repo} into the Hugging Face cache", file=sys.stderr)
    return 0


def cmd_models_convert_mvdream(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .models import sd21_tokenizer
    from .mvdream import convert

    tokenizer = sd21_tokenizer() if args.tokenizer == "sd21" else Path(args.tokenizer)
    out = convert(Path(args.checkpoint), Path(args.out), tokenizer)
    print(f"wrote {out}: a 4-view MVDream model; generate with --model {out}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """A queued job's cancellation is the reply itself; a running job's reply is `cancelling`,
    and its end follows as an event (it may still be `done` if it finished first)."""
    import time

    from ..shared.client import ClientError

    with _client(args) as client:
        try:
            client.request(MessageType.CANCEL, args.job, timeout=args.timeout)
        except ClientError as exc:
            if exc.code != ErrorCode.CANCELLED:
                raise
            print(f"cancelled {args.job}", file=sys.stderr)
            return 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            for msg in client.poll(0.5):
                if msg.job != args.job or msg.type not in (MessageType.DONE, MessageType.ERROR):
                    continue
                if msg.type == MessageType.DONE:
                    raise CliError(f"job {args.job} finished before it could be cancelled")
                if msg.fields.get("code") == ErrorCode.CANCELLED:
                    print(f"cancelled {args.job}", file=sys.stderr)
                    return 0
                raise CliError(printable(msg.fields.get("message", "cannot cancel")))
    raise CliError(f"the server is cancelling {args.job}, but it had not stopped within {args.timeout:g} s")


def _generation_options(g: argparse.ArgumentParser, image: bool = False) -> None:
    """Options that make a JobSpec; its validate() checks their ranges. `image`: the command
    also makes objects from an image (--image), whose prompt is optional."""
    if image:
        g.add_argument("prompt", nargs="?", default="", help="what the object is (optional with --image)")
        g.add_argument("--image", metavar="IMG", help="make the object this image shows (PNG, JPEG, WebP, ...): its front "
                       "is the image's view; the foreground is its alpha, --mask, or else the pixels unlike its "
                       "border's plain colour")
        g.add_argument("--mask", metavar="MASK", help="with --image: the foreground as a black-and-white image (white: "
                       "the object), or its alpha where it has transparency")
        g.add_argument("--elevation", type=float, help="with --image: degrees above the object the image was taken from "
                       "(-30..60, default 0)")
        g.add_argument("--fov", type=float, help="with --image: the image's vertical field of view in degrees (15..90, "
                       "default: the model's usual one)")
        g.add_argument("--novel-view", metavar="MODEL", help="with --image: a novel-view prior beside the text prior, "
                       "weighted as Magic123 weighs it: zero123-xl (Zero-1-to-3 XL from the Hub, MIT; a CUDA GPU "
                       "recommended), its Hub id or a folder (default: none)")
    else:
        g.add_argument("prompt")
    g.add_argument("--model", help="'embedded' (default), an alias (sd21, sd15), a Hub id or a folder")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, help="optimisation steps (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, help="render size in pixels, a multiple of 8")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--device", choices=[str(v) for v in Device], default=Device.AUTO)
    g.add_argument("--preview-every", type=int, default=0)
    g.add_argument("--mesh-resolution", type=int, help="marching cubes grid (32..256, default: the model's)")
    g.add_argument("--quality", choices=[str(v) for v in Quality],
                   help="the model's preset of steps, resolution, mesh resolution and refinement (default standard; "
                   "`promptmesh models` lists what each sets); explicit options win")
    g.add_argument("--max-faces", type=int, help="decimate the mesh to at most this many faces (default 20,000)")
    g.add_argument("--refine-steps", type=int, help="steps of the mesh refinement stage after the NeRF (sharper "
                   "surfaces; 0: none; default: the model's)")
    g.add_argument("--texture-size", type=int, metavar="PX",
                   help=f"side of the baked base-colour texture: {', '.join(map(str, TEXTURE_SIZES[1:]))}, or 0 for "
                   "vertex colours only (default: the model's, 1024 for every shipped one)")
    g.add_argument("--view-prompt", choices=[str(v) for v in ViewPrompt],
                   help="view-dependent prompts: the view word (hard), blended "
                   "along the azimuth (interpolated), blended with Perp-Neg (2 more denoiser passes per step), or "
                   "none, the prior's camera input alone (camera); default: the model's")
    g.add_argument("--objective", choices=[str(v) for v in Objective],
                   help="the distillation objective: sds (DreamFusion), vsd (ProlificDreamer: a LoRA of the prior trained "
                   "alongside, about 3x the time a step), nfsd, csd, ism (LucidDreamer: DDIM inversion, 2-6 more denoiser "
                   "passes a step) or x0 (MVDream); default: the model's (docs/objectives.md compares them)")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (OUT.ckpt.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside the output")
    p.add_argument("--threads", type=threads, default="auto", help=THREADS_HELP)


def threads(value: str) -> int | str:
    """--threads: "auto" or a positive count."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number of threads, got {value!r}")
    return int(value)


THREADS_HELP = ("CPU threads: 'auto' (default) uses every core while the machine is quiet and one when "
                "another process competes for them; a number fixes it (seeded runs repeat exactly at a fixed count)")


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    p.add_argument("--server-key", help="the server's public key file (CURVE)")
    p.add_argument("--client-key", help="this client's secret key file (CURVE)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="promptmesh", description="Text to 3D mesh by Score Distillation Sampling.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="optimise a NeRF for a prompt and write a vertex-coloured mesh")
    g.add_argument("-o", "--output", help="output file (default: the prompt's words .glb)")
    g.add_argument("--format", choices=[str(v) for v in MESH_FORMATS], help="file format (default: from -o, else glb)")
    _generation_options(g, image=True)
    g.add_argument("--preview-dir", help="write a preview PNG every --preview-every steps here")
    g.add_argument("--video", action="store_true", help="also write a turntable MP4 of the final NeRF")
    _run_options(g)
    g.set_defaults(func=cmd_generate)

    tx = sub.add_parser("texture", help="paint a given mesh from a prompt (its geometry stays as it is)")
    tx.add_argument("mesh", help="the mesh to paint: GLB/glTF, OBJ, PLY, STL, ... (its UVs are kept if it has them)")
    tx.add_argument("-o", "--output", help="output file (default: the mesh's name and the prompt's words .glb)")
    tx.add_argument("--format", choices=[str(v) for v in MESH_FORMATS], help="file format (default: from -o, else glb)")
    _generation_options(tx)
    tx.add_argument("--preview-dir", help="write a preview PNG every --preview-every steps here")
    _run_options(tx)
    tx.set_defaults(func=cmd_texture)

    srv = sub.add_parser("serve", help="run the job server")
    srv.add_argument("--bind", default="tcp://127.0.0.1:5555")
    srv.add_argument("--data-dir", default="promptmesh-data")
    srv.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    srv.add_argument("--keys", help="folder with server.key_secret and authorized/ (required off loopback)")
    srv.add_argument("--threads", type=threads, default="auto", help=THREADS_HELP)
    srv.add_argument("--models-dir", help="offer each subfolder here to clients, by its folder name")
    srv.add_argument("--allow-model", action="append", default=[], metavar="HUB_ID",
                     help="also offer this Hub id (repeatable); clients may name only offered models")
    srv.add_argument("--max-queue", type=int, default=100, help="jobs waiting at most, from all clients")
    srv.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where jobs run: in this process (default), or on a Ray cluster (pip install 'promptmesh[ray]')")
    srv.add_argument("--ray-address", help="with --executor ray: the cluster's head (host:port); default: a new "
                     "local cluster on loopback")
    srv.add_argument("--gpus-per-job", type=float, default=1, help="with --executor ray: GPUs each job takes")
    srv.add_argument("--cpus-per-job", type=float, default=1,
                     help="with --executor ray, on a cluster without GPUs: CPUs (and torch threads) each job takes")
    srv.add_argument("--retries", type=int, default=0, choices=(0, 1, 2, 3),
                     help="with --executor ray: rerun a job this many times when its worker or node is lost")
    srv.add_argument("--max-queue-per-client", type=int, default=20, help="jobs waiting at most per client connection")
    srv.add_argument("--max-texture-faces", type=int, default=MAX_FACES, help="the largest mesh a texture job may bring")
    srv.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="CURVE keys").add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    kg = keys.add_parser("generate", help="write a CURVE key pair NAME.key and NAME.key_secret")
    kg.add_argument("folder")
    kg.add_argument("--name", default="client")
    kg.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    kg.set_defaults(func=cmd_keys_generate)

    sm = sub.add_parser("submit", help="send a job to a server")
    _client_options(sm)
    sm.add_argument("-o", "--output", help="with --wait: write the result here")
    sm.add_argument("--wait", action="store_true", help="show progress until the job ends")
    sm.add_argument("--proxy-dir", help="with --wait: write the coarse 3D proxies the job sends as PLY files here")
    sm.add_argument("--proxy-every", type=float, default=3.0, help="seconds between proxies (at least 20x their cost)")
    sm.add_argument("--mesh", help="a texture job: paint this mesh file (as `promptmesh texture`) instead of making one")
    _generation_options(sm, image=True)
    sm.set_defaults(func=cmd_submit)
    jb = sub.add_parser("jobs", help="list a server's jobs: running and queued first, then the newest")
    _client_options(jb)
    jb.add_argument("--limit", type=int, default=100, help="at most this many jobs (1..500)")
    jb.add_argument("--prune", type=float, metavar="DAYS",
                    help="instead: delete the jobs (and results) that ended more than DAYS days ago")
    jb.set_defaults(func=cmd_jobs)
    ft = sub.add_parser("fetch", help="download a finished job's mesh")
    _client_options(ft)
    ft.add_argument("job")
    ft.add_argument("-o", "--output", required=True)
    ft.set_defaults(func=cmd_fetch)
    cn = sub.add_parser("cancel", help="cancel a queued or running job")
    _client_options(cn)
    cn.add_argument("job")
    cn.set_defaults(func=cmd_cancel)

    mo = sub.add_parser("models", help="list the model catalogue and what is downloaded")
    mo.set_defaults(func=cmd_models)
    mo_sub = mo.add_subparsers(dest="models_command", parser_class=Parser)
    md = mo_sub.add_parser("download", help="fetch what SDS needs of a model (resumable)")
    md.add_argument("model", help="an alias (sd21, sd15) or a Hub id")
    md.set_defaults(func=cmd_models_download)
    mc = mo_sub.add_parser("convert-mvdream", help="MVDream's released checkpoint (sd-v2.1-base-4view.pt of the Hub "
                           "repository MVDream/MVDream) -> a diffusers folder")
    mc.add_argument("checkpoint", help="the .pt file")
    mc.add_argument("out", help="the folder to write")
    mc.add_argument("--tokenizer", default="sd21", help="a folder with Stable Diffusion 2.1's tokenizer files, or "
                    "'sd21': the one in the Hugging Face cache (promptmesh models download sd21)")
    mc.set_defaults(func=cmd_models_convert_mvdream)

    ex = sub.add_parser("export", help="write FBX for Cinema 4D (Blender's exporter, needs bpy), or GLB/PLY/OBJ")
    ex.add_argument("source", help="a job id (in --data-dir) or a mesh file (.npz, .glb, .ply, .obj)")
    ex.add_argument("-f", "--format", choices=[str(v) for v in OutputFormat], help="default: from -o")
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--data-dir", default="promptmesh-data", help="the server's data folder, for job ids")
    ex.set_defaults(func=cmd_export)

    prior = sub.add_parser("prior", help="train or sample the embedded prior").add_subparsers(
        dest="prior_command", required=True, parser_class=Parser)
    t = prior.add_parser("train", help="train the embedded prior (CPU is fine; hours)")
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--dataset-size", type=int, default=40000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=200, help="steps of linear warm-up")
    t.add_argument("--init", default="", help="start from this prior folder ('embedded': the shipped one) "
                   "instead of from scratch; new words are added to its vocabulary")
    t.add_argument("--multiview", action="store_true", help="a multi-view prior (MVDream): groups of 4 renders of "
                   "one object a quarter-turn apart, denoised together; best started from a 2D prior (--init)")
    t.add_argument("--single-view-share", type=float, default=0.3,
                   help="with --multiview: the share of steps that train on single images (MVDream's 2D + 3D mix)")
    t.add_argument("--empty-caption-rate", type=float, default=0.1,
                   help="share of captions dropped at each step: what the unconditional branch of classifier-free "
                   "guidance learns from")
    bias = t.add_argument_group("view bias", "how the training images frame their subjects, as a photo collection "
                                "does (each defaults to backend/prior/data.py's ViewBias: 83 % of views within 60 "
                                "degrees of the front, 4 % within 45 of the back)")
    bias.add_argument("--front-sigma", type=float,
                      help="degrees: the spread of the azimuths drawn around the front")
    bias.add_argument("--uniform-share", type=float,
                      help="the share of azimuths drawn uniformly around the object instead (nearly every back view "
                      "comes from it)")
    bias.add_argument("--view-word-rate", type=float,
                      help="the share of single-image captions that name the view")
    bias.add_argument("--object-share", type=float,
                      help="the share of images showing an object with a front (the rest show primitives)")
    t.add_argument("--out", default="runs/prior")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to render the data and train (auto: a CUDA GPU if torch sees one)")
    t.set_defaults(func=cmd_prior_train)
    v = prior.add_parser("train-views", help="train an embedded novel-view prior for image jobs (--novel-view)")
    v.add_argument("--steps", type=int, help="optimiser steps (default 1,500)")
    v.add_argument("--batch-size", type=int, help="pairs a step (default 48)")
    v.add_argument("--references", type=int, help="pictures rendered, each with 4 other views of its subject (default 4,000)")
    v.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    v.add_argument("--seed", type=int)
    v.add_argument("--init", default=EMBEDDED, help="the prior to fine-tune: 'embedded' or a prior folder")
    v.add_argument("--out", default="runs/views")
    v.add_argument("--resume", action="store_true")
    v.set_defaults(func=cmd_prior_train_views)
    s = prior.add_parser("sample", help="draw 2D samples around the object to see what the prior knows")
    s.add_argument("prompt")
    s.add_argument("-o", "--output", default="samples.png")
    s.add_argument("--model", default="embedded", help="'embedded' or a folder written by `prior train` (a multi-view "
                   "prior draws each row as one object)")
    s.add_argument("--cameras", type=int, default=8, help="cameras around the object, one sample column each")
    s.add_argument("--rows", type=int, default=2)
    s.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance of the samples (default: 1, unguided: the shipped weights draw best so)")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_prior_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("promptmesh: interrupted (run again with --resume to continue from the last checkpoint)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"promptmesh: error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
    except PromptMeshError as exc:  # anything else is a bug and keeps its traceback
        print(f"promptmesh: error: {printable(exc)}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
