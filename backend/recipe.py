"""One recipe per prior: every setting a generation run needs, as one frozen dataclass tree,
stored as data beside the prior's weights.

A prior's `recipe.json` (a ModelCard: the recipe and the quality presets, as diffusers keeps a
config.json beside its weights) is written by `prior train` and `models convert-mvdream` into
the folders they make; the embedded weights carry one, and the catalogue's Stable Diffusion
entries name one shipped in backend/recipes/. `resolve` applies a job's quality preset and then
its explicit settings once; the resolved recipe is what the stages read, what the result's
metadata records and what a checkpoint must match to be resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from ..shared.result import atomic_write
from ..shared.spec import OPTIONAL, JobSpec, SpecError
from ..shared.vocab import Objective as ObjectiveKind
from ..shared.vocab import Quality, ViewPrompt
from .cameras import CameraRanges
from .field import FieldConfig
from .renderer import RenderConfig
from .shading import ShadingConfig

T = TypeVar("T")
_UNSET = object()  # a key one side of a comparison lacks


@dataclass(frozen=True)
class Schedule:
    """How long the optimisation runs and how noise level and field detail move along it."""

    steps: int
    t_range: tuple[float, float] = (0.02, 0.98)  # diffusion timesteps sampled, as fractions of the schedule
    t_max_end: float = 0.98  # t_max anneals linearly to this over the run
    field_levels_start: int = 2  # hash-grid levels active at step 0 (coarse-to-fine)
    coarse_to_fine_until: float = 0.5  # all hash-grid levels active by this fraction of the run


@dataclass(frozen=True)
class Optimisation:
    """Learning rates, regularisers and the occupancy-grid refresh of the SDS loop."""

    lr_grid: float = 1e-2
    lr_mlp: float = 1e-3
    lr_background: float = 1e-3
    # Adam fused into one pass per tensor: on the CPU, Stable Diffusion's dense 113^3 grid levels
    # (5.1M values) took 19 ms a step in Adam's default loop and 1.6 ms fused. The same update up
    # to float rounding, which SDS amplifies as it would a new seed.
    fused_adam: bool = True
    # Regularisers are summed over pixels like the SDS loss, so their weights do not depend
    # on the resolution relative to it.
    orientation_weight: float = 0.1
    entropy_weight: float = 0.5  # opacity entropy, switched on after `entropy_from` of the run
    entropy_from: float = 0.3
    occupancy_every: int = 16  # steps between occupancy-grid updates
    occupancy_warmup: int = 32  # steps before the grid is first measured and used


@dataclass(frozen=True)
class ViewPrompts:
    """How the camera's view enters the text condition (the Janus problem's first levers).

    Hard (DreamFusion): the nearest view word's prompt. `interpolate`: the front/side/back
    prompt embeddings blended linearly with the azimuth (stable-dreamfusion's scheme).
    `perp_neg` (Armandpour et al. 2023): the interpolated prompt guides, and the views the
    camera is not looking from are pushed away only along directions orthogonal to it, with
    weights `perp_neg_scale * exp(-decay * x)` (<= 0) that fade as the camera nears that view;
    it costs two more denoiser passes per step. Without `words` the prompt is used as typed
    and only the camera given to the prior (if it takes one) tells it the view."""

    words: bool = True
    interpolate: bool = False
    perp_neg: bool = False
    perp_neg_scale: float = -2.0
    front_decay: float = 2.0  # how fast the push away from "front" fades as the camera leaves the front
    side_decay: float = 10.0  # the same for "side"


@dataclass(frozen=True)
class Objective:
    """What the guided noise prediction pulls the renders towards (shared.vocab.Objective).

    "sds" (DreamFusion): the gradient (1 - alpha_bar) * (eps_guided - eps). "x0" (MVDream): the
    renders regress onto the denoiser's one-step reconstruction x0 = (z_t - sqrt(1 - alpha_bar)
    * eps_guided) / sqrt(alpha_bar), i.e. the SDS direction weighted sqrt((1 - alpha_bar) /
    alpha_bar); with `rescale` > 0 that reconstruction's spread is pulled towards the unguided
    one's, per object (CFG rescale, Lin et al. 2023), which keeps large guidance scales (MVDream
    uses 50) from oversaturating.

    "nfsd" (Katzir et al., ICLR 2024): w(t) * (delta_D + s * delta_C), delta_C = eps_text -
    eps_null and delta_D = eps_null below `nfsd_t_split` of the schedule (the paper's t = 200 of
    1000), eps_null - eps_negative above it. "csd" (Yu et al. 2023): the classifier score alone,
    w(t) * (s * delta_C - w_neg * (eps_negative - eps_null)), w_neg annealed linearly from
    `csd_negative_weight[0]` to `[1]` over the run. "ism" (LucidDreamer): x_s by DDIM inversion
    of the clean latents with the null prompt in strides of `ism_delta_s`, x_t one more inversion
    step of `ism_delta_t` above s, and w(t) * (eps_guided(x_t, t) - eps_null(x_s, s)). "vsd"
    (ProlificDreamer): w(t) * (eps_guided - eps_lora(x_t; y, camera)), the LoRA (`lora_*`)
    trained on the renders as it goes (backend/guidance/vsd.py).

    The negative prompt of NFSD and CSD is the job's, else `negative` where the prior can read it
    (the papers' own for Stable Diffusion; none for the embedded prior, whose words are its
    primitives): without one the negative term is zero."""

    kind: str = ObjectiveKind.SDS
    rescale: float = 0.0
    negative: str = ""
    nfsd_t_split: float = 0.2
    csd_negative_weight: tuple[float, float] = (1.0, 0.5)
    ism_delta_s: int = 200
    ism_delta_t: int = 50
    lora_rank: int = 4
    lora_lr: float = 1e-4
    lora_t_range: tuple[float, float] = (0.02, 0.98)  # timesteps of the LoRA's own diffusion loss
    lora_camera_dropout: float = 0.1  # share of the LoRA's training steps without the camera (its own CFG)
    lora_guidance_scale: float = 1.0  # CFG between the LoRA with and without the camera; 1: with it alone


@dataclass(frozen=True)
class MeshSettings:
    """Meshing of the final field; a spec's settings replace these."""

    resolution: int = 128  # marching-cubes grid
    # Decimated to this many faces (None: not at all). The texture carries the colour, and the UV
    # unwrap (xatlas) took 25 s on the 61k faces of a 128^3 marching-cubes cube, 4 s on the same
    # cube decimated to 20k, whose judged IoU was unchanged (0.699).
    max_faces: int | None = 20_000
    texture_size: int = 1024  # the baked base-colour texture's side; 0: none


@dataclass(frozen=True)
class RefineSettings:
    """The mesh refinement stage after the NeRF (backend/refine.py); 0 steps skips it."""

    steps: int = 0
    grid: int = 40  # cubes per side of the tetrahedral grid over the field's bound
    resolution: int = 64  # side of its renders, in pixels
    # the low-noise half, as Magic3D-style refinement stages use (threestudio's 0.02-0.5): the
    # whole range, or twice these learning rates, bends the faces of cubes (bench/refine.py)
    t_range: tuple[float, float] = (0.02, 0.5)
    color_share: float = 0.2  # the last share of its steps refines the colour on the fixed shape
    lr_sdf: float = 1.5e-3  # SDF values are in scene units
    lr_offset: float = 1.5e-2  # offsets are tanh-squashed to half a cell
    lr_color: float = 1e-3
    # Adam scales each parameter's step by its own gradient, so the regularisers must be strong
    # beside SDS's: at 0.5 and 0.1 the surface turns to noise within 50 steps.
    normal_weight: float = 2000.0  # 1 - cos between the normals of faces sharing an edge, mean
    laplacian_weight: float = 50.0  # squared uniform Laplacian in grid cells, mean (it rounds edges: 500 cost the cube 0.05 IoU)
    sigma: float = 0.5  # pixels of the rasteriser's antialiased outline


@dataclass(frozen=True)
class ReferenceSettings:
    """An image job's reference view (Magic123, Qian et al. 2023): its colour and mask losses
    and the balance of the priors on the other views. The paper's weights are for mean-squared
    errors (lambda_rgb 5, lambda_mask 0.5; threestudio's config keeps the same 10:1 ratio at
    10000:1000) and its joint prior weighs the 2D (text) prior 1 and the 3D (novel-view) prior 40
    (its release: --lambda_guidance 1.0 40, guidance scales 100 and 5). Here the errors are
    summed over pixels like the SDS loss (Optimisation's note), which keeps their balance with
    it independent of the resolution."""

    rgb_weight: float = 5.0
    mask_weight: float = 0.5
    prior_2d_weight: float = 1.0
    prior_3d_weight: float = 40.0  # where the job names a novel-view prior (JobSpec.novel_view)
    novel_view_guidance_scale: float = 5.0  # the 3D prior's classifier-free guidance (Magic123's release)
    every: int = 1  # steps between reference-view renders (stable-dreamfusion's known_view_interval)
    # Adam's learning rate for where the reference camera stands, learnt with the field (0: it
    # stays where the picture's recentring puts it, as in Magic123). The recentring centres the
    # foreground's box, which is not where a prior draws an object whose box is lopsided (a
    # mug's body, with its handle to one side), nor at its size; moving the camera lets the
    # text prior, which draws every subject centred and at its own size, place the object.
    offset_lr: float = 0.0


@dataclass(frozen=True)
class TextureSettings:
    """A texture job's (colour on a given mesh). Its colour settles in fewer steps than a shape:
    with the embedded prior, on 30 meshes x 2 seeds, 200 steps left 99.2 % of the visible surface
    even (within CIELAB 15 of its mean), 300 steps 98.1 % and 1,000 steps 90.9 %, the extra steps
    painting blotches; the colour was right in every run of all three (bench/texture.py,
    docs/texturing.md)."""

    steps: int = 200  # unless the job gives its own; the quality presets' step counts are a shape's


@dataclass(frozen=True)
class Recipe:
    """Everything a generation run needs besides the prompt, seed and device."""

    schedule: Schedule
    guidance_scale: float  # classifier-free guidance scale of the SDS gradient
    resolution: int  # side of the training renders, in pixels
    optim: Optimisation = Optimisation()
    field: FieldConfig = FieldConfig()
    render: RenderConfig = RenderConfig()
    cameras: CameraRanges = CameraRanges()
    shading: ShadingConfig = ShadingConfig()
    background: str = "mlp"  # "white" (fixed) or "mlp" (learnt from the ray direction)
    mesh: MeshSettings = MeshSettings()
    view_prompts: ViewPrompts = ViewPrompts()
    refine: RefineSettings = RefineSettings()
    objective: Objective = Objective()
    reference: ReferenceSettings = ReferenceSettings()
    texture: TextureSettings = TextureSettings()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists); `from_dict` rebuilds an equal recipe."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return _build(cls, data)

    def changed(self, changes: dict[str, Any]) -> Recipe:
        """This recipe with the leaves of the tree `changes` replaced (a preset's or an objective's;
        a ValueError names an unknown setting)."""
        return Recipe.from_dict(_merged(self.to_dict(), changes)) if changes else self

    def changes_from(self, old: dict[str, Any]) -> list[str]:
        """`dotted.path: old -> new` for every setting that differs from `old` (a `to_dict()`)."""
        before, after = _leaves(old), _leaves(self.to_dict())
        return [
            f"{key}: {before.get(key, 'unset')} -> {after.get(key, 'unset')}"
            for key in dict.fromkeys([*before, *after]) if before.get(key, _UNSET) != after.get(key, _UNSET)
        ]


VIEW_PROMPT_SETTINGS = {  # a job's `view_prompt` as ViewPrompts switches
    ViewPrompt.HARD: {"words": True, "interpolate": False, "perp_neg": False},
    ViewPrompt.INTERPOLATED: {"words": True, "interpolate": True, "perp_neg": False},
    ViewPrompt.PERP_NEG: {"words": True, "interpolate": True, "perp_neg": True},
    ViewPrompt.CAMERA: {"words": False, "interpolate": False, "perp_neg": False},
}
RECIPE_FILE = "recipe.json"
RECIPE_CHANGES = "recipe"  # the key of a preset's or an objective's changes to the recipe tree
CARDS_DIR = Path(__file__).with_name("recipes")  # the cards of models that carry none (Hub repositories)


@dataclass(frozen=True)
class ModelCard:
    """A prior's recipe and what each quality preset changes, as stored beside its weights.

    `presets` maps a Quality to the job settings it sets (JobSpec field names; the standard
    preset is the recipe itself) and, under "recipe", the part of the recipe's tree it changes
    (a short run's learning rates); `seconds` records measured time per object, by device type
    then preset, with `measured_on` saying where: the add-on shows it before a job is sent."""

    recipe: Recipe
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    measured_on: str = ""
    # Per objective kind, the Objective settings a job choosing it runs with (what its paper
    # publishes for this prior); a kind not listed runs with the defaults above and the recipe's.
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""  # provenance the card's numbers need, e.g. "not yet run on a GPU"

    def __post_init__(self) -> None:
        for quality, settings in self.presets.items():
            if quality not in set(Quality):
                raise ValueError(f"unknown quality preset {quality!r}: use {', '.join(Quality)}")
            unknown = set(settings) - set(OPTIONAL) - {RECIPE_CHANGES}
            if unknown:
                raise ValueError(f"the {quality} preset sets {', '.join(sorted(unknown))}: "
                                 f"presets set only {', '.join(OPTIONAL)} and {RECIPE_CHANGES}")
            self.recipe.changed(settings.get(RECIPE_CHANGES, {}))  # an unknown setting is refused at load
        for kind in self.objectives:
            self.recipe_for(kind)  # an unknown kind or setting is refused when the card loads

    def objective(self, kind: str) -> Objective:
        """The Objective a job choosing `kind` runs with: the recipe's own when it is that kind,
        else the defaults, then this card's settings for `kind`."""
        if kind not in set(ObjectiveKind):
            raise SpecError("objective", f"must be one of {', '.join(ObjectiveKind)}, got {kind!r}")
        base = self.recipe.objective if self.recipe.objective.kind == kind else Objective(kind=kind)
        settings = {k: v for k, v in self.objectives.get(kind, {}).items() if k != RECIPE_CHANGES}
        if "kind" in settings and settings["kind"] != kind:
            raise ValueError(f"the card's {kind} objective says kind {settings['kind']!r}")
        hints = get_type_hints(Objective)
        unknown = set(settings) - set(hints)
        if unknown:
            raise ValueError(f"the card's {kind} objective has no setting(s) {', '.join(sorted(unknown))}")
        return replace(base, **{k: _value(hints[k], v) for k, v in settings.items()})

    def recipe_for(self, kind: str) -> Recipe:
        """The recipe of a job choosing objective `kind`: the card's, with what the card's
        `objectives[kind]["recipe"]` changes (a part of the recipe's tree: the guidance scale,
        learning rates, t schedule its paper publishes) and that objective."""
        return replace(self.recipe.changed(self.objectives.get(kind, {}).get(RECIPE_CHANGES, {})),
                       objective=self.objective(kind))

    def to_dict(self) -> dict[str, Any]:
        out = {"recipe": self.recipe.to_dict(), "presets": self.presets, "seconds": self.seconds,
               "measured_on": self.measured_on}
        if self.objectives or self.notes:
            out |= {"objectives": self.objectives, "notes": self.notes}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """A misplaced part (a recipe setting at the top) is refused by name, not ignored."""
        parts = {f.name for f in fields(cls)}
        unknown = set(data) - parts
        if unknown:
            raise ValueError(f"a model card has no part(s) {', '.join(sorted(unknown))} (its parts: "
                             f"{', '.join(sorted(parts))}; recipe settings go under \"recipe\")")
        return cls(Recipe.from_dict(data["recipe"]), data.get("presets", {}), data.get("seconds", {}),
                   data.get("measured_on", ""), data.get("objectives", {}), data.get("notes", ""))

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """From a folder's recipe.json or a card file; a ValueError names the file at fault."""
        file = path / RECIPE_FILE if path.is_dir() else path
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file} is not a readable model card: {exc}") from exc

    def save(self, folder: Path) -> None:
        """Beside the weights in `folder`, as diffusers writes config.json."""
        atomic_write(folder / RECIPE_FILE, (json.dumps(self.to_dict(), indent=1) + "\n").encode())

    def preset(self, quality: str | None) -> dict[str, Any]:
        """The job settings `quality` sets (None: the standard preset)."""
        if quality is None:
            return {}
        if quality not in set(Quality):
            raise SpecError("quality", f"must be one of {', '.join(Quality)}, got {quality!r}")
        return dict(self.presets.get(quality, {}))

    def describe(self) -> dict[str, Any]:
        """What each preset means, for clients: {quality: {settings, seconds by device}}; the
        recipe changes are among the settings as dotted paths ("optim.lr_grid")."""
        out = {}
        for q in Quality:
            settings = self.preset(q)
            settings |= _leaves(settings.pop(RECIPE_CHANGES, {}))
            out[q.value] = {"settings": settings, "seconds": {d: s[q.value] for d, s in self.seconds.items() if q.value in s}}
        return out


def resolve(card: ModelCard, spec: JobSpec, painting: bool = False) -> Recipe:
    """The recipe a job runs with: the card's recipe (with its objective's changes), then the
    job's quality preset (its recipe changes, then its settings), then the settings the job
    gives explicitly (None: not given). A texture job (`painting`) runs the card's texture
    steps unless it gives its own, and none of the preset's recipe changes."""
    recipe = card.recipe if spec.objective is None else card.recipe_for(spec.objective)
    given = {name: getattr(spec, name) for name in OPTIONAL}
    preset = card.preset(spec.quality)
    changes = preset.pop(RECIPE_CHANGES, {})
    if painting:  # a preset's recipe changes are tuned for its generation run, not for painting
        preset = {**preset, "steps": recipe.texture.steps}
    else:
        recipe = recipe.changed(changes)
    settings = {**preset, **{k: v for k, v in given.items() if v is not None}}

    def pick(name: str, default: T) -> T:
        return settings.get(name, default)

    return replace(
        recipe,
        schedule=replace(recipe.schedule, steps=pick("steps", recipe.schedule.steps)),
        guidance_scale=pick("guidance_scale", recipe.guidance_scale),
        resolution=pick("resolution", recipe.resolution),
        mesh=MeshSettings(pick("mesh_resolution", recipe.mesh.resolution), pick("max_faces", recipe.mesh.max_faces),
                          pick("texture_size", recipe.mesh.texture_size)),
        view_prompts=(recipe.view_prompts if spec.view_prompt is None
                      else replace(recipe.view_prompts, **VIEW_PROMPT_SETTINGS[ViewPrompt(spec.view_prompt)])),
        refine=replace(recipe.refine, steps=pick("refine_steps", recipe.refine.steps)),
    )


def _build(cls: Any, data: dict[str, Any]) -> Any:
    """A dataclass from `to_dict` data: nested dataclasses rebuilt, lists back to tuples."""
    hints = get_type_hints(cls)
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting(s) {', '.join(sorted(unknown))}")
    return cls(**{name: _value(hints[name], value) for name, value in data.items()})


def _value(hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and is_dataclass(hint):
        return _build(hint, value)
    return tuple(value) if isinstance(value, list) else value


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` (a to_dict tree) with the leaves `changes` gives replaced; an unknown key stays, for
    `_build` to refuse by name."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to {"dotted.path": value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
