"""An embedded novel-view prior (Zero-1-to-3's idea in our world): the embedded prior's UNet told
a picture of an object from the front, on three more input channels, and asked for the object
from another camera (its class embedding's camera, as for text). `promptmesh prior train-views`.

- Data: pairs of renders of one subject and colour. The reference is the subject from the front
  (azimuth 0) at an elevation drawn over the prior's range, at the mean distance and field of
  view, put through what an image job does to a picture (the plain-background matte, then
  recentred to the prior's framing). The target is the same subject from a camera drawn as SDS
  draws its views, lit as SDS lights them.
- Model: the embedded prior fine-tuned, its first convolution widened from 3 to 6 input
  channels with zero weights on the new ones (so it starts as the text prior, as Zero-1-to-3
  starts from an image-conditioned model). Captions are always empty: the picture says what the
  object is. One reference in ten is dropped (zeros) to train the unconditional branch.
- The saved folder is a prior folder (tokenizer, text encoder, unet, scheduler, recipe.json)
  whose UNet takes 6 channels: `--novel-view FOLDER` loads it (guidance/embedded.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from ...shared.errors import PromptMeshError
from ...shared.image import ImageError, foreground_rgba
from ...shared.result import atomic_write
from ...shared.vocab import ErrorCode
from ..cameras import Cameras, make_cameras, sample_cameras
from ..recipe import Recipe
from . import WEIGHTS_DIR
from .data import SUBJECTS
from .model import IMAGE_SIZE, EmbeddedPrior, camera_features
from .shapes import OBJECTS, PALETTE, SHAPES

REFERENCE_CHANNELS = 3
REFERENCE_SUPERSAMPLE = 2  # the reference is rendered at twice the prior's size, as a picture is larger than 32 px


def widen(unet: UNet2DConditionModel, extra: int = REFERENCE_CHANNELS) -> UNet2DConditionModel:
    """The UNet with `extra` more input channels whose weights start at zero (its config says so)."""
    old = unet.conv_in
    new = torch.nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)
    return unet


def framed_references(rgb: torch.Tensor, size: int, share: float) -> torch.Tensor:
    """[B, 3, S, S] renders in 0..1 on white -> [B, 3, size, size] in 0..1 as an image job sees
    them: the matte's foreground, recentred to `share` of the frame, on white."""
    from ..framing import recentre  # the image job's own recentring

    out = []
    for image in (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
        try:
            rgba = foreground_rgba(image)
        except ImageError:  # a subject cut off or too small to matte: leave it whole, on white
            rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
        colour, mask = recentre(rgba, size, share)
        out.append(colour * mask + (1 - mask))
    return torch.cat(out)


def render_pairs(count: int, per_reference: int, generator: torch.Generator, recipe: Recipe,
                 device: torch.device | str = "cpu") -> dict:
    """`count` references, each with `per_reference` targets: uint8 images, the targets' cameras
    [N, 4] (elevation, azimuth, distance, fov in degrees) and each target's reference index."""
    from ..framing import frame_share
    from .data import render_primitives
    from .train import RENDER_CHUNK

    ranges = recipe.cameras
    is_object = torch.rand(count, generator=generator) < 0.5
    ids = torch.where(is_object, len(SHAPES) + torch.randint(len(OBJECTS), (count,), generator=generator),
                      torch.randint(len(SHAPES), (count,), generator=generator))
    palette = torch.tensor(list(PALETTE.values()))
    colors = (palette[torch.randint(len(PALETTE), (count,), generator=generator)]
              + (torch.rand(count, 3, generator=generator) - 0.5) * 0.08).clamp(0, 1)
    elevation = ranges.elevation[0] + torch.rand(count, generator=generator) * (60.0 - ranges.elevation[0])
    mean = lambda lo_hi: torch.full((count,), sum(lo_hi) / 2)  # noqa: E731
    front = make_cameras(elevation, torch.zeros(count), mean(ranges.distance), mean(ranges.fovy))
    shapes = [SUBJECTS[i] for i in ids.tolist()]
    owner = torch.arange(count).repeat_interleave(per_reference)
    cams = sample_cameras(len(owner), generator, ranges)
    to8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731

    def rendered(names: list[str], tint: torch.Tensor, seen: Cameras, size: int) -> torch.Tensor:
        """In chunks of RENDER_CHUNK (all drawn first, so the data do not depend on the chunk)."""
        return torch.cat([to8(render_primitives(names[i:i + RENDER_CHUNK], tint[i:i + RENDER_CHUNK],
                                                seen[i:i + RENDER_CHUNK], size, ambient=recipe.shading.ambient,
                                                device=device).cpu()) for i in range(0, len(names), RENDER_CHUNK)])

    refs = rendered(shapes, colors, front, IMAGE_SIZE * REFERENCE_SUPERSAMPLE)
    refs = to8(framed_references(refs.float() / 255, IMAGE_SIZE, frame_share(ranges)))
    targets = rendered([shapes[i] for i in owner.tolist()], colors[owner], cams, IMAGE_SIZE)
    return {"references": refs, "targets": targets, "owner": owner,
            "cameras": torch.stack([cams.elevation, cams.azimuth, cams.distance, torch.rad2deg(cams.fovy)], -1)}


@dataclass
class ViewsConfig:
    steps: int = 1500
    batch_size: int = 48
    references: int = 4000
    per_reference: int = 4
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    drop_rate: float = 0.1  # references dropped (zeros): the unconditional branch
    seed: int = 0
    checkpoint_every: int = 250
    init: str = str(WEIGHTS_DIR)  # the prior fine-tuned


def train_views(out: Path, config: ViewsConfig, resume: bool = False) -> EmbeddedPrior:
    """Train (or resume) the novel-view prior; returns the EMA model, also saved under OUT/prior."""
    from .train import CARD, Training, learning_rate

    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu") if resume and ckpt_path.exists() else None
    if state is not None and state["config"] != asdict(config):
        raise PromptMeshError(f"{ckpt_path} was written under other settings: pass the same options, or another --out",
                              ErrorCode.BAD_REQUEST)
    data_path = out / "pairs.pt"
    made = (config.seed, config.references, config.per_reference)
    data = torch.load(data_path, weights_only=False) if data_path.exists() else None
    if data is None or data.get("made") != made:
        t0 = time.time()
        data = {**render_pairs(config.references, config.per_reference, torch.Generator().manual_seed(config.seed),
                               CARD.recipe), "made": made}
        data["render_seconds"] = time.time() - t0
        atomic_write(data_path, lambda f: torch.save(data, f))
    torch.manual_seed(config.seed)
    model = EmbeddedPrior.from_pretrained(config.init)
    widen(model.unet)
    model.text_encoder.requires_grad_(False)  # captions are empty: only the UNet learns
    run = Training.start(model, model.unet.parameters(), config.lr, config.ema_decay, config.seed + 1, state)
    generator = run.generator
    alphas = model.scheduler.alphas_cumprod
    with torch.no_grad():
        states, pooled = model.encode_text([""])
    log = open(out / "loss.csv", "a" if run.step else "w")
    if run.step == 0:
        log.write("step,loss,lr,seconds\n")
    bar = tqdm(total=config.steps, initial=run.step, desc="training novel-view prior", unit="step")
    t0, running = time.time(), math.nan
    while run.step < config.steps:
        pick = torch.randint(len(data["owner"]), (config.batch_size,), generator=generator)
        x = data["targets"][pick].float().div(127.5).sub(1.0)
        ref = data["references"][data["owner"][pick]].float().div(127.5).sub(1.0)
        keep = (torch.rand(config.batch_size, generator=generator) >= config.drop_rate).float().view(-1, 1, 1, 1)
        cam = data["cameras"][pick]
        cameras = make_cameras(cam[:, 0], cam[:, 1], cam[:, 2], cam[:, 3])
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = torch.cat([a.sqrt() * x + (1 - a).sqrt() * noise, ref * keep], 1)
        lr = learning_rate(run.step, config)
        run.set_lr(lr)
        n = config.batch_size
        pred = model.predict_noise(noisy, t, states.expand(n, -1, -1), pooled.expand(n, -1),
                                   camera_features(cameras, CARD.recipe.cameras))
        loss = torch.nn.functional.mse_loss(pred, noise)
        run.descend(loss)
        value = loss.item()
        running = value if math.isnan(running) else 0.98 * running + 0.02 * value
        log.write(f"{run.step},{value:.5f},{lr:.3e},{time.time() - t0:.1f}\n")
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            log.flush()
            run.save(out, asdict(config), 1)
    bar.close()
    log.close()
    return run.ema

