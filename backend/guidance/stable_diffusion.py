"""Stable Diffusion guidance (latent space), loaded with diffusers/transformers `from_pretrained`."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ..cameras import Cameras, mvdream_cameras
from ..models import CATALOGUE, cached_file
from ..multiview import load_unet, views_per_group
from ..recipe import ModelCard
from .base import Guidance, ModelLoadError, weight_hashes
from .vsd import camera_labels

DEFAULT_MODEL_ID = CATALOGUE["sd21"].repos[0]
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One quick connection attempt, so that a machine without network fails in seconds
    rather than after the Hub client's minutes of retries."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_cached(model: str) -> bool:
    try:
        DDPMScheduler.load_config(model, subfolder="scheduler", local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def _snapshot(model: str) -> Path | None:
    """The cached snapshot folder of a Hub id (None: not cached; from_pretrained then says what
    is missing). Not snapshot_download(local_files_only): recent huggingface_hub (2.4 here)
    refuses a snapshot missing any file of the repository, and `promptmesh models download`
    fetches only what SDS needs."""
    hit = cached_file(model, "model_index.json")
    return hit[1].parent if hit else None


def _variant(folder: Path | None, component: str) -> str | None:
    """"fp16" when the component's only weights are the fp16 variant (what `promptmesh models
    download` fetches where a repository has it), else None (the default files)."""
    if folder is None:
        return None
    weights = [p.name for p in (folder / component).glob("*.safetensors")]
    return "fp16" if weights and all(".fp16." in name for name in weights) else None


def provenance(model: str, local: bool, components: tuple[str, ...]) -> dict:
    """Where the weights came from: the folder, or the Hub id with the cached snapshot's commit,
    and the sha256 of the weight files of the `components` distillation uses."""
    if local:
        folder, source, revision = Path(model), str(Path(model).resolve()), None
    else:
        snapshot = _snapshot(model)  # what from_pretrained just loaded
        if snapshot is None:
            raise FileNotFoundError(f"{model} is not in the Hugging Face cache")
        folder = snapshot
        source, revision = model, folder.name
    return {"source": source, "revision": revision, "sha256": weight_hashes(folder, components)}


def repository_missing(exc: BaseException) -> bool:
    """Whether loading failed because the Hub has no such repository (or refuses it)."""
    from huggingface_hub.errors import DisabledRepoError, GatedRepoError, RepositoryNotFoundError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (RepositoryNotFoundError, GatedRepoError, DisabledRepoError)):
            return True
        if "is not a valid model identifier" in str(seen) or "Repository Not Found" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class Source:
    """Where a diffusers-layout model loads from: a folder, the local cache, or the Hub."""

    local: bool  # a folder
    local_only: bool  # no network: a folder, offline, or already cached
    folder: Path | None  # the files, where they are here already


def open_source(model: str, components: tuple[str, ...]) -> Source:
    """Check that a folder has every component folder, or that a Hub id is cached or the Hub
    can be reached, before any from_pretrained: each failure gets one line that says what to do."""
    local = Path(model).is_dir()
    if not local and Path(model).exists():
        raise ModelLoadError(f"model path {model} is not a folder")
    if local:
        missing = [c for c in components if not (Path(model) / c).is_dir()]
        if missing:
            raise ModelLoadError(f"model folder {model} lacks the component folder(s): {', '.join(missing)}")
    local_only = local or _offline() or _is_cached(model)
    if not local_only and not _hub_reachable():
        raise ModelLoadError(
            f"model {model!r} is not in the local Hugging Face cache and huggingface.co cannot be reached: "
            f"download it on a connected machine (`promptmesh models download {model}`) or pass a local folder"
        )
    return Source(local, local_only, Path(model) if local else (_snapshot(model) if local_only else None))


def load_failure(model: str, local: bool, exc: BaseException, what: str) -> ModelLoadError:
    """The one-line error for a from_pretrained that failed on `model` (a `what`)."""
    if not local and repository_missing(exc):
        return ModelLoadError(
            f"the Hugging Face Hub has no model {model!r} (removed, renamed, private or gated): use an alias, "
            f"{' or '.join(a for a in CATALOGUE if a != 'embedded')}, or a local folder")
    where = "folder" if local else "Hub id"
    hint = "" if local else (
        " (offline: download it first with `huggingface-cli download "
        f"{model}` on a connected machine, or pass a local folder)"
    )
    return ModelLoadError(f"cannot load {what} from {where} {model!r}{hint}: {exc}")


class StableDiffusionGuidance(Guidance):
    """SDS against Stable Diffusion: renders are upsampled to the UNet's native size (512 for
    SD 2.1-base), VAE-encoded, and scored by the frozen UNet (fp16 and no grad on CUDA)."""

    def __init__(self, card: ModelCard, model: str = DEFAULT_MODEL_ID, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.card = card
        device = torch.device(device)
        # Half precision on CUDA (fp16 LayerNorm has no CPU kernel); the SDS arithmetic stays fp32.
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        source = open_source(model, COMPONENTS)
        local, local_only, folder = source.local, source.local_only, source.folder
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=local_only)
            self.text_encoder = CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", torch_dtype=self.dtype, local_files_only=local_only,
                variant=_variant(folder, "text_encoder"),
            )
            self.unet = load_unet(  # with a multi-view processor where its config asks for one
                model, subfolder="unet", torch_dtype=self.dtype, local_files_only=local_only, variant=_variant(folder, "unet")
            )
            self.views_per_group = views_per_group(self.unet)
            self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype, local_files_only=local_only,
                                                     variant=_variant(folder, "vae"))
            scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=local_only)
        except (OSError, ValueError) as exc:
            raise load_failure(model, local, exc, "Stable Diffusion") from exc
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False).eval().to(device)
        self.weights = provenance(model, local, ("unet", "vae", "text_encoder"))
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(device, torch.float32), persistent=False)
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = self.unet.config.sample_size * vae_scale
        self.scaling_factor = self.vae.config.scaling_factor

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.scaling_factor

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state

    def lora_base(self) -> nn.Module:
        return self.unet

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cameras: Cameras,
                      unet: nn.Module | None = None) -> torch.Tensor:
        labels = mvdream_cameras(cameras).to(noisy.device, self.dtype) if self.views_per_group > 1 else None
        if unet is not None:  # VSD's LoRA, told the camera; with autograd, so that it can learn
            labels = camera_labels(labels, cameras, self.dtype, noisy.device)
            # fp16 weights with float32 adapters: autocast runs each layer in the precision it can
            with torch.autocast(noisy.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                return unet(noisy.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype),
                            class_labels=labels).sample.float()
        with torch.no_grad():
            return self.unet(noisy.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype),
                             class_labels=labels).sample.float()
