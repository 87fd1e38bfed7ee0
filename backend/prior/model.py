"""The embedded prior in diffusers/transformers terms: a word-level tokenizer, a tiny
`CLIPTextModel`, a pixel-space `UNet2DConditionModel` and a DDPM schedule.

Besides the caption the UNet sees the camera (elevation, azimuth, distance, field of view)
through its class embedding, next to the pooled text embedding: our renderer knows the
camera of every training image and of every SDS view, which makes the prior's views of
one object agree with each other (the lever Zero-1-to-3 and MVDream pull).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ...shared.errors import PromptMeshError
from ...shared.spec import unknown_words
from ...shared.vocab import ErrorCode
from ..cameras import CameraRanges, Cameras
from ..multiview import load_unet, views_per_group
from .shapes import OBJECTS, PALETTE, SHAPES

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]
# New words go at the end, so a model trained on an older list keeps its token ids.
WORDS = ["a", "an", ",", "view", "front", "side", "back", "overhead", *PALETTE, *SHAPES, *OBJECTS]
MAX_TOKENS = 12
IMAGE_SIZE = 32
CAMERA_FEATURES = 6
TEXT_WIDTH = 64


class UnknownWordsError(PromptMeshError):
    """The prompt uses words the embedded prior was never trained on."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, unknown: list[str], subjects: list[str]) -> None:
        self.unknown = unknown
        super().__init__(
            f"the embedded prior does not know {', '.join(repr(w) for w in unknown)}: it makes a "
            f"{'/'.join(subjects)} in {'/'.join(PALETTE)} (e.g. \"a red cube\"). For other prompts use "
            "the sd21 model (Stable Diffusion 2.1; a CUDA GPU is recommended)"
        )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS that wraps every caption in [BOS] ... [EOS]."""
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # As a text encoder reads a caption: case and sentence punctuation ("A Red Cube.") carry no
    # meaning here; the comma stays a word (the view suffix). shared.spec.prompt_words agrees.
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[\p{P}&&[^,]]"), " ")])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=1, eos_token_id=3,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=16,
        class_embed_type="projection", projection_class_embeddings_input_dim=TEXT_WIDTH + CAMERA_FEATURES,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def camera_features(cameras: Cameras, ranges: CameraRanges) -> torch.Tensor:
    """[B, 6]: sin/cos of azimuth and elevation, and distance and field of view mapped to [-1, 1]
    over `ranges`, the camera ranges the prior was trained on (its recipe's)."""

    def unit(x: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return (x - (lo + hi) / 2) / ((hi - lo) / 2)

    az, el = torch.deg2rad(cameras.azimuth), torch.deg2rad(cameras.elevation)
    fov = torch.rad2deg(cameras.fovy)
    return torch.stack(
        [az.sin(), az.cos(), el.sin(), el.cos(), unit(cameras.distance, ranges.distance), unit(fov, ranges.fovy)], -1
    ).float()


class EmbeddedPrior(torch.nn.Module):
    """Tokenizer, text encoder, UNet and schedule of the embedded prior, saved as one folder
    with `tokenizer/`, `text_encoder/`, `unet/` and `scheduler/` like a diffusers pipeline."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
    ) -> None:
        super().__init__()
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.text_encoder, self.unet = text_encoder, unet

    @classmethod
    def create(cls) -> EmbeddedPrior:
        tokenizer = build_tokenizer()
        return cls(tokenizer, build_text_encoder(len(tokenizer)), build_unet(), build_scheduler())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EmbeddedPrior:
        path = Path(path)
        missing = [p for p in ("tokenizer", "text_encoder", "unet", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"embedded prior folder {path} lacks {', '.join(missing)}")
        return cls(
            PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            load_unet(path / "unet"),
            DDPMScheduler.from_pretrained(path / "scheduler"),
        )

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")

    @property
    def views_per_group(self) -> int:
        """4 for a multi-view prior (MVDream's recipe: whole groups of views are denoised
        together), 1 for a 2D prior."""
        return views_per_group(self.unet)

    @property
    def known_words(self) -> list[str]:
        return [w for w in self.tokenizer.get_vocab() if w not in SPECIAL_TOKENS]

    def check_prompt(self, text: str) -> None:
        """Raise UnknownWordsError if the text has words outside the vocabulary."""
        unknown = unknown_words(text, self.known_words)
        if unknown:
            raise UnknownWordsError(unknown, [w for w in SHAPES + OBJECTS if w in self.known_words])

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """[B, MAX_TOKENS] token ids, padded."""
        return self.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, D] and the pooled ([EOS]) state [B, D]."""
        return self.encode_ids(self.token_ids(captions))

    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_text for captions tokenized already (training tokenizes its few distinct captions once)."""
        out = self.text_encoder(input_ids=ids.to(next(self.text_encoder.parameters()).device))
        return out.last_hidden_state, out.pooler_output

    def predict_noise(
        self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor, cameras: torch.Tensor,
        unet: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Epsilon prediction for pixel-space inputs in [-1, 1]; `cameras` are camera_features.
        `unet` replaces `denoise` (the guidance passes its traced copy)."""
        labels = torch.cat([pooled, cameras.to(pooled)], -1)
        return (unet or self.denoise)(noisy, t, states, labels)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The UNet's call with positional tensors only, as a trace takes it."""
        return self.unet(noisy, t, encoder_hidden_states=states, class_labels=labels, return_dict=False)[0]
