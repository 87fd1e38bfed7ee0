"""Training of the embedded prior on CPU (or CUDA), from scratch or from earlier weights
(`--init`): `promptmesh prior train`.

The dataset is rendered once into `OUT/dataset.pt` (deterministic from the seed); training
state goes to `OUT/checkpoint.pt` every `checkpoint_every` steps, the EMA weights to
`OUT/prior/` (the folder that ships as backend/prior/weights) and the loss to `OUT/loss.csv`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from ...shared.errors import PromptMeshError
from ...shared.result import atomic_folder, atomic_write
from ...shared.vocab import ErrorCode
from ..cameras import Cameras, make_cameras
from ..multiview import make_multiview, single_views
from ..recipe import CARDS_DIR, ModelCard
from . import WEIGHTS_DIR
from .data import MIRROR_SYMMETRIC, SUBJECTS, ViewBias, draw_captions, make_batch, possible_captions
from .model import IMAGE_SIZE, EmbeddedPrior, build_tokenizer, camera_features

CARD = ModelCard.load(WEIGHTS_DIR)
RECIPE = CARD.recipe  # the prior learns the views and lighting SDS will show it
# A multi-view prior learns the view from its camera alone (its captions name none): its card.
MULTIVIEW_CARD = ModelCard.load(CARDS_DIR / "embedded-multiview.json")
RENDER_CHUNK = 2048  # images drawn and rendered at a time (the draws depend on it: one value everywhere)
LOG_EVERY = 50  # steps between writes of loss.csv
# What a checkpoint written before a setting existed trained under, where no value of the
# setting reproduces it: such a checkpoint is refused rather than resumed under a new regime.
# (A setting missing from this table counts at its default.)
BEFORE = {"empty_caption_rate": "captions dropped once per image, in the dataset"}


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
    empty_caption_rate: float = 0.1  # share of captions dropped at each step (classifier-free guidance)
    # > 1: a multi-view prior (MVDream) denoising groups of `views` renders of one object together;
    # a share of its steps trains on single images (MVDream found the 2D + 3D mix better).
    views: int = 1
    single_view_share: float = 0.3


def render_dataset(size: int, seed: int, bias: ViewBias, chunk: int = RENDER_CHUNK, views: int = 1,
                   device: torch.device | str = "cpu") -> dict:
    """Render `size` images with their prompts (in groups of `views` renders of one subject) on `device`;
    the same dataset on any device (the draws are the CPU generator's). Images stored as uint8
    to keep the cache small."""
    generator = torch.Generator().manual_seed(seed)
    images, prompts, cams, subjects = [], [], [], []
    for start in tqdm(range(0, size, chunk), desc="rendering subjects", unit="chunk"):
        batch = make_batch(min(chunk, size - start), IMAGE_SIZE, generator, RECIPE, bias, views, device)
        images.append((batch.images * 255).round().to(torch.uint8))
        prompts += batch.prompts
        subjects.append(batch.shape_ids)
        c = batch.cameras
        cams.append(torch.stack([c.elevation, c.azimuth, c.distance, torch.rad2deg(c.fovy)], -1))
    return {"images": torch.cat(images), "prompts": prompts, "cameras": torch.cat(cams),
            "subjects": torch.cat(subjects), "seed": seed, "bias": asdict(bias), "views": views, "chunk": chunk}


def load_or_render_dataset(out: Path, config: TrainConfig, views: int = 1, device: torch.device | str = "cpu") -> dict:
    """OUT/dataset.pt (single images) or OUT/dataset-{views}view.pt, rendered when missing or
    made under other settings."""
    path = out / ("dataset.pt" if views == 1 else f"dataset-{views}view.pt")
    chunk = RENDER_CHUNK - RENDER_CHUNK % views  # whole groups: a group never straddles two chunks
    if path.exists():
        data = torch.load(path, weights_only=False)
        # a dataset from before captions were drawn per step has no "prompts" (it stored its captions): re-rendered
        made = (data["seed"], data.get("bias"), data.get("views", 1), data.get("chunk"), len(data.get("prompts", ())))
        if made == (config.seed, asdict(config.bias), views, chunk, config.dataset_size):
            return data
    t0 = time.time()
    data = render_dataset(config.dataset_size, config.seed, config.bias, chunk, views, device)
    data["render_seconds"] = time.time() - t0
    atomic_write(path, lambda f: torch.save(data, f))
    return data


class LearningSchedule(Protocol):
    """What learning_rate reads of a training's settings (TrainConfig, views.ViewsConfig)."""

    lr: float
    warmup: int
    steps: int


def learning_rate(step: int, config: LearningSchedule) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def initial_model(config: TrainConfig) -> EmbeddedPrior:
    """A fresh prior, or the one in `config.init` with its vocabulary grown to today's words
    (new words are appended, so its token ids keep their meaning; their embeddings start at
    the mean of the old ones); a multi-view one if `config.views` > 1 (MVDream fine-tunes a 2D
    prior so: the same weights, with self-attention across the views)."""
    model = EmbeddedPrior.create() if not config.init else EmbeddedPrior.from_pretrained(config.init)
    if config.views > 1:
        make_multiview(model.unet, config.views)
    if not config.init:
        return model
    old, new = model.tokenizer.get_vocab(), build_tokenizer()
    if any(new.get_vocab().get(w) != i for w, i in old.items()):
        raise PromptMeshError(f"{config.init}'s vocabulary is not a prefix of today's: train from scratch", ErrorCode.BAD_REQUEST)
    model.tokenizer = new
    model.text_encoder.resize_token_embeddings(len(new))
    return model


def draw_batch(data: dict, mirrorable: torch.Tensor, size: int, views: int, generator: torch.Generator,
               alphas: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, list[str], Cameras, torch.Tensor, torch.Tensor]:
    """A noisy training batch of `size` images from `data` (whole groups of `views` renders,
    one timestep per group and independent noise per view), captioned afresh (data.draw_captions
    with `config`'s rates): (noisy, captions, cameras, t, noise)."""
    groups = size // views
    first = torch.randint(len(data["prompts"]) // views, (groups,), generator=generator) * views
    idx = (first[:, None] + torch.arange(views)).flatten()
    x = data["images"][idx].float().div(127.5).sub(1.0)
    cam = data["cameras"][idx].clone()
    # Mirror images left-right with the azimuth negated: a valid new view of a subject that is
    # symmetric about the x = 0 plane (its light and the camera ranges are); a group as a whole.
    flip = ((torch.rand(groups, generator=generator) < 0.5) & mirrorable[first]).repeat_interleave(views)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    cam[:, 1] = torch.where(flip, -cam[:, 1], cam[:, 1])
    cameras = make_cameras(cam[:, 0], cam[:, 1], cam[:, 2], cam[:, 3])
    noise = torch.randn(x.shape, generator=generator)
    t = torch.randint(0, len(alphas), (groups,), generator=generator).repeat_interleave(views)
    a = alphas[t].view(-1, 1, 1, 1)
    captions = draw_captions([data["prompts"][i] for i in idx.tolist()], cameras, views, generator,
                             config.empty_caption_rate, config.bias.view_word_rate)
    return a.sqrt() * x + (1 - a).sqrt() * noise, captions, cameras, t, noise


@dataclass
class Training:
    """What a training run carries from step to step and checkpoints: the model, its EMA copy,
    the optimiser, the one generator and the step. The step's descent and the saving are
    written once for the 2D, multi-view and novel-view priors."""

    model: EmbeddedPrior
    ema: EmbeddedPrior
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema_decay: float
    step: int = 0

    @classmethod
    def start(cls, model: EmbeddedPrior, params: Iterable[torch.nn.Parameter], lr: float, ema_decay: float, seed: int,
              state: dict | None = None) -> Training:
        """AdamW over `params`, the EMA a copy of `model`; from a checkpoint's `state` when given."""
        ema = copy.deepcopy(model).requires_grad_(False)
        run = cls(model, ema, torch.optim.AdamW(params, lr=lr, weight_decay=1e-4), torch.Generator().manual_seed(seed),
                  ema_decay)
        if state is not None:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.generator.set_state(state["generator"])
            run.step = state["step"]
        return run

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def descend(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` (gradients clipped to norm 1), then the EMA's update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1

    def save(self, out: Path, config: dict, views: int) -> None:
        """OUT/checkpoint.pt (with the settings `config` it was trained under) and the EMA
        weights with their card under OUT/prior."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "step": self.step, "config": config}
        atomic_write(out / "checkpoint.pt", functools.partial(torch.save, state))
        atomic_folder(out / "prior", lambda folder: save_with_card(self.ema, folder, views))


def save_with_card(prior: EmbeddedPrior, folder: Path, views: int) -> None:
    """The weights and, beside them, the card SDS reads (recipe.json): a prior's recipe is the one
    it was trained under; no time has been measured for new weights."""
    prior.save_pretrained(folder)
    replace(CARD if views == 1 else MULTIVIEW_CARD, seconds={}, measured_on="").save(folder)


def train(out: Path, config: TrainConfig, resume: bool = False, device: torch.device | str = "cpu") -> EmbeddedPrior:
    """Train (or resume) the prior; returns the EMA model, also saved under OUT/prior."""
    if config.views < 1 or config.batch_size % config.views or config.dataset_size % config.views:
        raise PromptMeshError(f"the batch size ({config.batch_size}) and the dataset size ({config.dataset_size}) must be "
                              f"whole groups of {config.views} views", ErrorCode.BAD_REQUEST)
    if not 0.0 <= config.empty_caption_rate < 1.0:
        raise PromptMeshError(f"the empty-caption rate must be at least 0 and below 1, not {config.empty_caption_rate}",
                              ErrorCode.BAD_REQUEST)
    bias = config.bias
    shares = {"uniform share": bias.uniform_share, "view-word rate": bias.view_word_rate, "object share": bias.object_share}
    for name, share in shares.items():
        if not 0.0 <= share <= 1.0:
            raise PromptMeshError(f"the view bias's {name} must be between 0 and 1, not {share}", ErrorCode.BAD_REQUEST)
    if not bias.front_sigma > 0.0:
        raise PromptMeshError(f"the view bias's front sigma must be above 0 degrees, not {bias.front_sigma}",
                              ErrorCode.BAD_REQUEST)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu") if resume and ckpt_path.exists() else None
    if state is not None:  # checked before the dataset is rendered (minutes on a CPU)
        now = asdict(config)
        written = {**asdict(TrainConfig()), **BEFORE, **state["config"]}
        changed = {k: (v, now.get(k)) for k, v in written.items() if v != now.get(k)}
        if changed:
            raise PromptMeshError(f"{ckpt_path} was written under other settings (written, now: {changed}): pass the "
                                  "same options, or another --out to start over", ErrorCode.BAD_REQUEST)
    datasets = {1: load_or_render_dataset(out, config, device=device)}
    if config.views > 1:
        datasets[config.views] = load_or_render_dataset(out, config, config.views, device)
    torch.manual_seed(config.seed)
    if torch.device(device).type == "cuda":  # the tiny UNet is launch-bound there: let cuDNN pick, TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    model = initial_model(config).to(device)
    run = Training.start(model, model.parameters(), config.lr, config.ema_decay, config.seed + 1, state)
    generator = run.generator
    alphas = model.scheduler.alphas_cumprod
    mirrorable = {v: torch.tensor([SUBJECTS[i] in MIRROR_SYMMETRIC for i in d["subjects"].tolist()])
                  for v, d in datasets.items()}
    # The few distinct captions are tokenized once: tokenizing a batch of 2,048 took 31 ms on
    # 2 CPU cores, a sixth of a step on an H100.
    distinct = possible_captions({p for d in datasets.values() for p in d["prompts"]})
    caption_row, caption_ids = {c: i for i, c in enumerate(distinct)}, model.token_ids(distinct)
    log = open(out / "loss.csv", "a" if run.step else "w")
    if run.step == 0:
        log.write("step,loss,lr,seconds\n")
    bar = tqdm(total=config.steps, initial=run.step, desc="training prior", unit="step")
    t0, running = time.time(), None
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # (step, lr, seconds, loss on the device)

    def write_log() -> None:
        """The losses since the last write, read off the device in one sync (a sync a step
        would stall a GPU between steps)."""
        nonlocal running
        if not pending:
            return
        values = torch.stack([loss for *_, loss in pending]).tolist()
        for (at, rate, seconds, _), value in zip(pending, values, strict=True):
            running = value if running is None else 0.98 * running + 0.02 * value
            log.write(f"{at},{value:.5f},{rate:.3e},{seconds:.1f}\n")
        log.flush()
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{pending[-1][1]:.1e}")
        pending.clear()

    while run.step < config.steps:
        views = config.views
        if views > 1 and torch.rand((), generator=generator) < config.single_view_share:
            views = 1
        noisy, captions, cameras, t, noise = draw_batch(
            datasets[views], mirrorable[views], config.batch_size, views, generator, alphas, config)
        lr = learning_rate(run.step, config)
        run.set_lr(lr)
        states, pooled = model.encode_ids(caption_ids[[caption_row[c] for c in captions]])
        with single_views(model.unet) if views == 1 else contextlib.nullcontext():
            pred = model.predict_noise(noisy.to(device), t.to(device), states, pooled,
                                       camera_features(cameras, RECIPE.cameras))
        loss = torch.nn.functional.mse_loss(pred, noise.to(device))
        run.descend(loss)
        pending.append((run.step, lr, time.time() - t0, loss.detach()))
        bar.update(1)
        if run.step % LOG_EVERY == 0:
            write_log()
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            write_log()
            run.save(out, asdict(config), config.views)
    bar.close()
    log.close()
    return run.ema
