"""Recipes and model cards: one per prior, stored beside its weights, reloaded exactly from plain
data, a job's quality preset and explicit settings applied once."""

import json
from dataclasses import replace

import pytest

from promptmesh.backend.guidance.loading import model_card
from promptmesh.backend.recipe import CARDS_DIR, ModelCard, Recipe, resolve
from promptmesh.shared.spec import JobSpec, SpecError

CARDS = {"embedded": model_card("embedded"), "sd21": model_card("sd21"), "mvdream": ModelCard.load(CARDS_DIR / "mvdream.json")}
RECIPES = {name: card.recipe for name, card in CARDS.items()}
EMBEDDED = CARDS["embedded"]


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_a_recipe_saved_as_json_reloads_exactly(recipe):
    data = json.loads(json.dumps(recipe.to_dict()))
    again = Recipe.from_dict(data)
    assert again == recipe  # lists are tuples again: (0.02, 0.98) != [0.02, 0.98]
    assert hash(again) == hash(recipe)
    assert again.to_dict() == data


def test_unknown_settings_are_refused_by_name():
    data = EMBEDDED.recipe.to_dict()
    data["schedule"]["warp"] = 2
    with pytest.raises(ValueError, match="Schedule has no setting.* warp"):
        Recipe.from_dict(data)


def test_changes_are_named_by_dotted_path():
    base = EMBEDDED.recipe
    changed = replace(base, schedule=replace(base.schedule, steps=600), background="mlp")
    assert changed.changes_from(base.to_dict()) == [f"schedule.steps: {base.schedule.steps} -> 600", "background: white -> mlp"]
    assert base.changes_from(base.to_dict()) == []


@pytest.mark.parametrize("card", CARDS.values(), ids=CARDS.keys())
def test_a_spec_without_settings_keeps_the_recipe(card):
    assert resolve(card, JobSpec("a red cube")) == card.recipe
    assert resolve(card, JobSpec("a red cube", quality="standard")) == card.recipe


def test_a_texture_job_runs_the_cards_texture_steps_whatever_the_preset_unless_it_gives_its_own():
    texture_steps = EMBEDDED.recipe.texture.steps
    assert texture_steps != EMBEDDED.recipe.schedule.steps  # else this shows nothing
    for quality in ("draft", "standard", "high"):
        spec = JobSpec("a red cube", quality=quality)
        assert resolve(EMBEDDED, spec, painting=True).schedule.steps == texture_steps
        assert resolve(EMBEDDED, spec).schedule.steps == EMBEDDED.preset(quality).get("steps", EMBEDDED.recipe.schedule.steps)
    assert resolve(EMBEDDED, JobSpec("a red cube", steps=77), painting=True).schedule.steps == 77


def test_spec_settings_override_the_recipe():
    base = EMBEDDED.recipe
    spec = JobSpec("a red cube", steps=7, resolution=48, guidance_scale=3.5, mesh_resolution=64, max_faces=500,
                   texture_size=256, refine_steps=30)
    assert resolve(EMBEDDED, spec).changes_from(base.to_dict()) == [
        f"schedule.steps: {base.schedule.steps} -> 7", f"guidance_scale: {base.guidance_scale} -> 3.5", "resolution: 32 -> 48",
        "mesh.resolution: 128 -> 64", "mesh.max_faces: 20000 -> 500", "mesh.texture_size: 1024 -> 256",
        "refine.steps: 0 -> 30",
    ]
    # zero is a setting, not a missing one
    assert resolve(EMBEDDED, JobSpec("a red cube", guidance_scale=0.0)).guidance_scale == 0.0
    refining = replace(EMBEDDED, recipe=replace(base, refine=replace(base.refine, steps=50)))
    assert resolve(refining, JobSpec("a red cube", refine_steps=0)).refine.steps == 0
    for bad in (-1, 20001, 2.5, True):
        with pytest.raises(SpecError, match="refine_steps"):
            JobSpec("a red cube", refine_steps=bad).validate()


def test_the_views_setting_switches_view_blending_and_perp_neg_and_bad_values_are_named():
    from promptmesh.shared.spec import SpecError

    base = EMBEDDED.recipe
    assert resolve(EMBEDDED, JobSpec("a red cube", view_prompt="perp-neg")).changes_from(base.to_dict()) == [
        "view_prompts.interpolate: False -> True", "view_prompts.perp_neg: False -> True"]
    assert resolve(EMBEDDED, JobSpec("a red cube", view_prompt="interpolated")).changes_from(base.to_dict()) == [
        "view_prompts.interpolate: False -> True"]
    assert resolve(EMBEDDED, JobSpec("a red cube", view_prompt="camera")).changes_from(base.to_dict()) == [
        "view_prompts.words: True -> False"]
    assert resolve(EMBEDDED, JobSpec("a red cube", view_prompt="hard")) == base
    with pytest.raises(SpecError, match="view_prompt: must be one of hard, interpolated, perp-neg, camera"):
        JobSpec.from_dict({"prompt": "a red cube", "view_prompt": "sideways"})


@pytest.mark.parametrize("size", [0, 64, 1024, 4096])
def test_texture_sizes_are_zero_or_powers_of_two_from_64_to_4096(size):
    assert JobSpec.from_dict({"prompt": "a red cube", "texture_size": size}).texture_size == size


@pytest.mark.parametrize("size, complaint", [(100, "power of two"), (32, "power of two"), (8192, "between 0 and 4096"),
                                             (-1, "between 0 and 4096"), ("1024", "expected an integer"),
                                             (True, "expected an integer")])
def test_a_bad_texture_size_is_refused_naming_the_field(size, complaint):
    from promptmesh.shared.spec import SpecError

    with pytest.raises(SpecError, match=f"texture_size: .*{complaint}"):
        JobSpec.from_dict({"prompt": "a red cube", "texture_size": size})


def test_quality_presets_come_from_the_models_card_and_explicit_settings_win():
    assert resolve(EMBEDDED, JobSpec("a red cube", quality="draft")).schedule.steps == EMBEDDED.presets["draft"]["steps"] == 500
    high = resolve(EMBEDDED, JobSpec("a red cube", quality="high"))
    assert (high.schedule.steps, high.mesh.resolution, high.refine.steps) == (2400, 192, 300)
    assert resolve(EMBEDDED, JobSpec("a red cube", quality="high", steps=50, refine_steps=0)).changes_from(
        EMBEDDED.recipe.to_dict()) == ["schedule.steps: 1000 -> 50", "mesh.resolution: 128 -> 192"]
    sd_draft = resolve(CARDS["sd21"], JobSpec("a red cube", quality="draft"))
    assert (sd_draft.schedule.steps, sd_draft.resolution) == (1500, 64)  # not the embedded prior's draft
    with pytest.raises(SpecError, match="quality: must be one of draft, standard, high, got 'ultra'"):
        JobSpec.from_dict({"prompt": "a red cube", "quality": "ultra"})


def test_a_preset_may_change_the_recipe_tree_for_generation_but_not_for_painting():
    """A short preset's own learning rates: applied under that quality only, before explicit
    settings, not to a texture job, shown to clients as dotted paths, and refused when unknown."""
    base = EMBEDDED.recipe
    card = replace(EMBEDDED, presets={"draft": {"steps": 40, "recipe": {"optim": {"lr_grid": 0.05}}}})
    draft = resolve(card, JobSpec("a red cube", quality="draft", steps=30))
    assert draft.changes_from(base.to_dict()) == [f"schedule.steps: {base.schedule.steps} -> 30",
                                                  f"optim.lr_grid: {base.optim.lr_grid} -> 0.05"]
    assert resolve(card, JobSpec("a red cube")) == base
    assert resolve(card, JobSpec("a red cube", quality="draft"), painting=True).optim == base.optim
    assert resolve(card, JobSpec("a red cube", quality="draft", objective="nfsd")).optim.lr_grid == 0.05
    assert card.describe()["draft"]["settings"] == {"steps": 40, "optim.lr_grid": 0.05}
    assert card.presets["draft"]["recipe"] == {"optim": {"lr_grid": 0.05}}  # resolving took nothing from the card
    with pytest.raises(ValueError, match="Optim.* no setting.* lr_warp"):
        ModelCard(base, {"draft": {"recipe": {"optim": {"lr_warp": 1.0}}}})


def test_a_card_saved_beside_weights_reloads_exactly_and_a_bad_one_is_named(tmp_path):
    EMBEDDED.save(tmp_path)
    assert ModelCard.load(tmp_path) == EMBEDDED
    assert model_card(str(tmp_path)) == EMBEDDED  # a folder's own card wins over its kind's
    (tmp_path / "recipe.json").write_text('{"recipe": {"schedule": {"steps": 10}}}')
    with pytest.raises(Exception, match="recipe.json is not a readable model card"):
        model_card(str(tmp_path))
    with pytest.raises(ValueError, match="presets set only"):
        ModelCard(EMBEDDED.recipe, {"draft": {"seed": 3}})
    misplaced = {**EMBEDDED.to_dict(), "reference": {"offset_lr": 0.001}}  # a recipe setting put at the top
    (tmp_path / "recipe.json").write_text(json.dumps(misplaced))
    with pytest.raises(ValueError, match="no part.* reference .*go under \"recipe\""):
        ModelCard.load(tmp_path)


def test_a_folder_without_a_card_gets_the_card_of_its_kind(tmp_path):
    """A Stable Diffusion folder, a converted MVDream one (multi-view UNet) and a prior folder of
    our own kind each get their kind's recipe and presets, not Stable Diffusion's for all."""
    sd, mv, ours = tmp_path / "sd", tmp_path / "mv", tmp_path / "ours"
    for folder, views in ((sd, None), (mv, 4), (ours, None)):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"multiview_views": views} if views else {}))
    (sd / "model_index.json").write_text("{}")
    (mv / "model_index.json").write_text("{}")
    assert model_card(str(sd)).recipe == RECIPES["sd21"]
    assert model_card(str(mv)).recipe == RECIPES["mvdream"] and model_card(str(mv)).recipe.objective.kind == "x0"
    assert model_card(str(ours)) == EMBEDDED
