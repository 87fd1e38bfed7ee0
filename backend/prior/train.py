"""Training of the embedded prior on CPU (or CUDA), from scratch or from earlier weights
(`--init`): `promptmesh prior train`.

The dataset is rendered once into `OUT/dataset.pt` (deterministic from the seed); training
state goes to `OUT/checkpoint.pt` every `checkpoint_every` steps, the EMA weights to
`OUT/prior/` (the folder that ships as backend/prior/weights) and the loss to `OUT/loss.csv`.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ...shared.errors import BAD_REQUEST, PromptMeshError
from ...shared.result import atomic_folder, atomic_write
from ..cameras import make_cameras
from ..guidance.embedded import EmbeddedGuidance
from .data import MIRROR_SYMMETRIC, SUBJECTS, ViewBias, make_batch
from .model import IMAGE_SIZE, EmbeddedPrior, build_tokenizer, camera_features

RECIPE = EmbeddedGuidance.recipe  # the prior learns the views and lighting SDS will show it


@dataclass
class TrainConfig:
    steps: int = 12000
    batch_size: int = 64
    dataset_size: int = 40000
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    init: str = ""  # a prior folder to start from (fine-tuning); "" trains from scratch
    bias: ViewBias = field(default_factory=ViewBias)


def render_dataset(size: int, seed: int, bias: ViewBias, chunk: int = 512) -> dict:
    """Render `size` captioned images; images stored as uint8 to keep the cache small."""
    generator = torch.Generator().manual_seed(seed)
    images, captions, cams, subjects = [], [], [], []
    for start in tqdm(range(0, size, chunk), desc="rendering subjects", unit="chunk"):
        batch = make_batch(min(chunk, size - start), IMAGE_SIZE, generator, RECIPE, bias)
        images.append((batch.images * 255).round().to(torch.uint8))
        captions += batch.captions
        subjects.append(batch.shape_ids)
        c = batch.cameras
        cams.append(torch.stack([c.elevation, c.azimuth, c.distance, torch.rad2deg(c.fovy)], -1))
    return {"images": torch.cat(images), "captions": captions, "cameras": torch.cat(cams),
            "subjects": torch.cat(subjects), "seed": seed, "bias": asdict(bias)}


def load_or_render_dataset(out: Path, config: TrainConfig) -> dict:
    path = out / "dataset.pt"
    if path.exists():
        data = torch.load(path, weights_only=False)
        same = data["seed"] == config.seed and data.get("bias") == asdict(config.bias)
        if same and len(data["captions"]) == config.dataset_size:
            return data
    t0 = time.time()
    data = render_dataset(config.dataset_size, config.seed, config.bias)
    data["render_seconds"] = time.time() - t0
    atomic_write(path, lambda f: torch.save(data, f))
    return data


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def initial_model(config: TrainConfig) -> EmbeddedPrior:
    """A fresh prior, or the one in `config.init` with its vocabulary grown to today's words
    (new words are appended, so its token ids keep their meaning; their embeddings start at
    the mean of the old ones)."""
    if not config.init:
        return EmbeddedPrior.create()
    model = EmbeddedPrior.from_pretrained(config.init)
    old, new = model.tokenizer.get_vocab(), build_tokenizer()
    if any(new.get_vocab().get(w) != i for w, i in old.items()):
        raise PromptMeshError(f"{config.init}'s vocabulary is not a prefix of today's: train from scratch", BAD_REQUEST)
    model.tokenizer = new
    model.text_encoder.resize_token_embeddings(len(new))
    return model


def train(out: Path, config: TrainConfig, resume: bool = False, device: str = "cpu") -> EmbeddedPrior:
    """Train (or resume) the prior; returns the EMA model, also saved under OUT/prior."""
    out.mkdir(parents=True, exist_ok=True)
    data = load_or_render_dataset(out, config)
    torch.manual_seed(config.seed)
    model = initial_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed + 1)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != asdict(config):
            raise PromptMeshError(f"{ckpt_path} was written under other settings ({state['config']}): pass the same "
                                  "options, or another --out to start over", BAD_REQUEST)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
    alphas = model.scheduler.alphas_cumprod.to(device)
    images_u8, captions, cams = data["images"], data["captions"], data["cameras"]
    mirrorable = torch.tensor([SUBJECTS[i] in MIRROR_SYMMETRIC for i in data["subjects"].tolist()])
    log = open(out / "loss.csv", "a" if step else "w")
    if step == 0:
        log.write("step,loss,lr,seconds\n")
    bar = tqdm(total=config.steps, initial=step, desc="training prior", unit="step")
    t0, running = time.time(), None
    while step < config.steps:
        idx = torch.randint(len(captions), (config.batch_size,), generator=generator)
        x = images_u8[idx].float().div(127.5).sub(1.0)
        cam = cams[idx].clone()
        # Mirror images left-right with the azimuth negated: a valid new view of a subject that is
        # symmetric about the x = 0 plane (its light and the camera ranges are).
        flip = (torch.rand(config.batch_size, generator=generator) < 0.5) & mirrorable[idx]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        cam[:, 1] = torch.where(flip, -cam[:, 1], cam[:, 1])
        cameras = make_cameras(cam[:, 0], cam[:, 1], cam[:, 2], cam[:, 3])
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        states, pooled = model.encode_text([captions[i] for i in idx.tolist()])
        pred = model.predict_noise(noisy.to(device), t.to(device), states, pooled, camera_features(cameras, RECIPE.cameras))
        loss = torch.nn.functional.mse_loss(pred, noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
        log.write(f"{step},{loss.item():.5f},{lr:.3e},{time.time() - t0:.1f}\n")
        if step % config.checkpoint_every == 0 or step == config.steps:
            log.flush()
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "step": step, "config": asdict(config)}
            atomic_write(ckpt_path, functools.partial(torch.save, state))
            atomic_folder(out / "prior", ema.save_pretrained)
    bar.close()
    log.close()
    return ema
