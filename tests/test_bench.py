"""The benchmarks' own machinery: before_after's two sides, the judges' colour and agreement
measures, and the GPU day (bench/gpu_day.py) with its full-size twins (bench/fullsize_cpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_mv_consistency_tells_one_object_from_views_of_differently_turned_ones():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from mv_consistency import agreement, quarter_turn_group, yaw_ious
    from prior_samples import silhouette

    from promptmesh.backend.cameras import make_cameras
    from promptmesh.backend.prior.data import render_primitives
    from promptmesh.backend.prior.model import IMAGE_SIZE
    from promptmesh.backend.prior.shapes import PALETTE

    cams = quarter_turn_group(torch.Generator().manual_seed(3))

    def views_of(turns: list[float]) -> torch.Tensor:  # view k of the mug turned by turns[k]
        seen = make_cameras(cams.elevation, cams.azimuth - torch.tensor(turns), cams.distance, torch.rad2deg(cams.fovy))
        return silhouette(render_primitives(["mug"] * 4, torch.tensor([PALETTE["red"]] * 4), seen, IMAGE_SIZE))

    one = agreement(yaw_ious("mug", "red", cams, views_of([90.0] * 4)))  # one mug, turned a quarter
    assert one["one object"] > 0.98 and one["own yaw"] > 0.98 and one["told yaw"] < 0.9
    told = agreement(yaw_ious("mug", "red", cams, views_of([0.0] * 4)))
    assert told["told yaw"] > 0.98
    apart = agreement(yaw_ious("mug", "red", cams, views_of([0.0, 90.0, 180.0, 270.0])))  # four different mugs
    assert apart["own yaw"] > 0.98 and apart["one object"] < apart["own yaw"] - 0.05


def test_prior_samples_judges_each_palette_colour_under_shading_as_itself():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from prior_samples import judged_colors

    from promptmesh.backend.cameras import CameraRanges, sample_cameras
    from promptmesh.backend.prior.data import render_primitives
    from promptmesh.backend.prior.model import IMAGE_SIZE
    from promptmesh.backend.prior.shapes import PALETTE

    cams = sample_cameras(len(PALETTE), torch.Generator().manual_seed(5), CameraRanges())
    colors = torch.tensor(list(PALETTE.values()))
    for subject in ("duck", "cube"):
        images = render_primitives([subject] * len(PALETTE), colors, cams, IMAGE_SIZE)
        assert judged_colors(subject, images, cams).tolist() == list(range(len(PALETTE)))
        # a blue subject drawn purple is judged purple, whatever the shading
        swapped = render_primitives([subject] * len(PALETTE), colors[[4, 1, 4, 3, 4]], cams, IMAGE_SIZE)
        assert judged_colors(subject, swapped, cams).tolist() == [4, 1, 4, 3, 4]


def test_the_full_size_models_are_built_at_their_published_sizes():
    """bench/fullsize_cpu.py's full size, counted on the meta device: Stable Diffusion 2.1-base's
    UNet, VAE and text encoder as published, and MVDream's UNet the same plus its camera input."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    from fullsize_cpu import SIZES, sd_unet_config
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from promptmesh.backend.mvdream import unet_config

    size = SIZES["full"]
    with torch.device("meta"):
        sd = UNet2DConditionModel(**sd_unet_config(size))
        mv = UNet2DConditionModel(**unet_config(size.ldm, {}))
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(size.ldm, {}))
        text = CLIPTextModel(CLIPTextConfig(**size.text, max_position_embeddings=77, hidden_act="gelu"))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert (count(sd), count(vae), count(text)) == (865_910_724, 83_653_863, 340_387_840)
    camera = 16 * 1280 + 1280 + 1280 * 1280 + 1280  # linear, SiLU, linear into the 1,280-wide time embedding
    assert count(mv) == count(sd) + camera
    assert sd.config.sample_size == 64 and mv.config.sample_size == 32  # 512 px images; MVDream's 256 px
    z_unet, z_vae, z_vision = size.zero123
    with torch.device("meta"):
        zero123 = UNet2DConditionModel(**z_unet)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**z_vision))
    # SD 1's UNet (859,520,964) with 4 more input channels' 3x3 kernels into 320
    assert count(zero123) == 859_520_964 + 4 * 9 * 320
    # CLIP ViT-L/14's image tower: 14 px patches, 257 positions, 24 layers of 1,024, projection to 768
    layer = 4 * (1024 * 1024 + 1024) + 2 * 2048 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    assert count(vision) == 3 * 14 * 14 * 1024 + 1024 + 257 * 1024 + 2048 + 24 * layer + 2048 + 1024 * 768
    assert AutoencoderKL(**z_vae).config == vae.config and zero123.config.sample_size == 32  # SD's VAE; 256 px


def test_gpu_day_plans_the_trainings_into_the_time_left_and_drops_them_when_it_is_short():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_day import FULL, MIN_TRAIN_STEPS, make_plan

    short, usual, long = (make_plan(FULL, budget, 16) for budget in (400, 540, 3000))
    assert short.train_steps == 0 and "dropped" in short.note and short.after == FULL.baseline
    assert MIN_TRAIN_STEPS <= usual.train_steps < FULL.max_train_steps and usual.total_s <= 540 - 30
    assert long.train_steps == FULL.max_train_steps and long.after == FULL.after
    for budget in range(300, 1500, 20):  # whatever the budget, the estimate keeps inside it
        plan = make_plan(FULL, budget, 16)
        assert plan.total_s <= budget or plan.train_steps == 0
        assert plan.train_steps == 0 or plan.train_steps >= MIN_TRAIN_STEPS


@pytest.mark.slow
def test_gpu_day_dry_run_runs_every_part_at_tiny_size_on_the_cpu(tmp_path):
    """bench/gpu_day.py --dry-run: the tiny twins of the full-size pipelines measured through
    bench/gpu_smoke.py, both trainings, and the benchmarks before and after, all from the
    commands a GPU day runs."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_day.py"), "--dry-run", "--out", str(out),
                           "--work", str(work), "--budget", "900", "--cores", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sd, mv, z = summary["smoke"]["sd"], summary["smoke"]["mvdream"], summary["smoke"]["zero123"]
    assert sd["ok"] and mv["ok"] and z["ok"], z
    for figures in (sd, mv, z):
        assert figures["seconds_per_step"] > 0 and figures["nonfinite_losses"] == 0 and figures["faces"] > 0
        assert figures["half_precision"]["vae_finite"] and figures["half_precision"]["unet_finite"]
        assert 0 < figures["stages"]["optimising"]["rss_gib"] < 8 and figures["first_preview_seconds"] > 0
    assert sd["refine_steps"] == 1 and sd["refine_seconds_per_step"] > 0 and "refining" in sd["stages"]
    assert mv["refine_steps"] == 0 and mv["resolution"] == 64
    assert z["refine_steps"] == 0 and "zero123-random-tiny" in z["novel_view"]["source"]  # an image job with it
    models = work / "models"
    weights = sorted(p.relative_to(models).as_posix() for p in models.rglob("*.safetensors"))
    assert weights == ["mvdream-random-tiny/unet/diffusion_pytorch_model.fp16.safetensors",
                       "sd21-random-tiny/text_encoder/model.fp16.safetensors",
                       "sd21-random-tiny/unet/diffusion_pytorch_model.fp16.safetensors",
                       "sd21-random-tiny/vae/diffusion_pytorch_model.fp16.safetensors",  # MVDream links SD's others
                       "zero123-random-tiny/clip_camera_projection/diffusion_pytorch_model.safetensors",
                       "zero123-random-tiny/image_encoder/model.safetensors",
                       "zero123-random-tiny/unet/diffusion_pytorch_model.safetensors",
                       "zero123-random-tiny/vae/diffusion_pytorch_model.safetensors"]  # fp16, unnamed, as released
    assert "FAILED" not in (out / "smoke" / "report.txt").read_text()
    assert summary["plan"]["train_steps"] == 2
    for kind in ("2d", "mv"):
        assert summary["trainings"][f"train-{kind}"]["returncode"] == 0
        assert (out / "train" / kind / "prior" / "unet" / "config.json").is_file()
        assert len((out / "train" / kind / "loss.csv").read_text().splitlines()) == 3  # a header and 2 steps
    assert summary["trainings"]["janus-shipped"]["returncode"] == 0
    assert "janus_rate_default" in (out / "logs" / "janus-shipped.txt").read_text()
    assert summary["benchmarks"]["prompt_accuracy-trained"]["returncode"] == 0
    accuracy = (out / "logs" / "prompt_accuracy-trained.txt").read_text()
    assert f"--model {work / '2d' / 'prior'}" in accuracy and "objects: 1;" in accuracy
    assert summary["total_s"] < 900


def test_the_objectives_bench_dry_run_runs_every_objective_and_counts_what_each_costs(capsys):
    """bench/objectives.py --quick: every objective on a shape and an object with a front, judged
    and tabled; the denoiser passes per step are each objective's own (SDS, NFSD and CSD 2 on the
    embedded prior, which reads no negative prompt; VSD 4; ISM 3 plus its inversion's 1 to 5)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from objectives import main

    rows = main(["--quick"])
    assert sorted((r["objective"], r["subject"]) for r in rows) == sorted(
        (o, s) for o in ("sds", "nfsd", "csd", "ism", "vsd") for s in ("cube", "mug"))
    passes = {r["objective"]: r["passes"] for r in rows if "passes" in r}
    assert passes["sds"] == passes["nfsd"] == passes["csd"] == 2 and passes["vsd"] == 4
    assert 4 <= passes["ism"] <= 8
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.startswith("| objective") and "cube sharpness" in table
    assert table.count("\n| ") == 5  # a line per objective below the header


def test_the_objectives_bench_keeps_its_rows_across_runs_and_runs_only_what_is_missing(tmp_path, capsys):
    """--rows: a second run of the same grid runs nothing and tables the kept rows; a row lost from
    the file (a run stopped part way) is the only one run again."""
    sys.path.insert(0, str(ROOT / "bench"))
    from objectives import main

    kept = tmp_path / "rows.jsonl"
    grid = ["--quick", "--objectives", "sds,csd", "--rows", str(kept)]
    first = main(grid)
    lines = kept.read_text().splitlines()
    assert len(first) == len(lines) == 4 and all(json.loads(line)["commit"] for line in lines)
    capsys.readouterr()
    again = main(grid)
    assert "4 objects, 0 to run" in capsys.readouterr().out
    verdicts = [(r["objective"], r["subject"], r["judged"]) for r in first]
    assert [(r["objective"], r["subject"], r["judged"]) for r in again] == verdicts
    kept.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # the third row (csd on the cube) lost
    third = main(grid)
    assert "4 objects, 1 to run" in capsys.readouterr().out
    assert len(kept.read_text().splitlines()) == 4 and [r["subject"] for r in third] == ["cube", "mug", "cube", "mug"]


def test_cube_sharpness_is_one_for_a_cube_at_any_yaw_and_small_for_a_sphere():
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    import trimesh
    from objectives import cube_sharpness

    from promptmesh.backend.prior.judge import _turned

    box = trimesh.creation.box((1, 1, 1))
    assert cube_sharpness(_turned(box.vertices, 0.4), box.faces) > 0.999
    sphere = trimesh.creation.icosphere(4)
    assert cube_sharpness(sphere.vertices, sphere.faces) < 0.2
    rounded = trimesh.creation.box((1, 1, 1)).subdivide().subdivide()
    rounded.vertices = rounded.vertices / np.linalg.norm(rounded.vertices, axis=1, keepdims=True) ** 0.3  # bulged
    assert 0.2 < cube_sharpness(rounded.vertices, rounded.faces) < 0.999
