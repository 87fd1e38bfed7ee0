"""Recipes: one per prior, reloaded exactly from plain data, a job spec's overrides applied once."""

import json
from dataclasses import replace

import pytest

from promptmesh.backend.guidance.embedded import EmbeddedGuidance
from promptmesh.backend.guidance.stable_diffusion import StableDiffusionGuidance
from promptmesh.backend.recipe import Recipe, resolve
from promptmesh.shared.spec import JobSpec, SpecError

RECIPES = {"embedded": EmbeddedGuidance.recipe, "stable-diffusion": StableDiffusionGuidance.recipe}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_a_recipe_saved_as_json_reloads_exactly(recipe):
    data = json.loads(json.dumps(recipe.to_dict()))
    again = Recipe.from_dict(data)
    assert again == recipe  # lists are tuples again: (0.02, 0.98) != [0.02, 0.98]
    assert hash(again) == hash(recipe)
    assert again.to_dict() == data


def test_unknown_settings_are_refused_by_name():
    data = EmbeddedGuidance.recipe.to_dict()
    data["schedule"]["warp"] = 2
    with pytest.raises(ValueError, match="Schedule has no setting.* warp"):
        Recipe.from_dict(data)


def test_changes_are_named_by_dotted_path():
    base = EmbeddedGuidance.recipe
    changed = replace(base, schedule=replace(base.schedule, steps=600), background="mlp")
    assert changed.changes_from(base.to_dict()) == [f"schedule.steps: {base.schedule.steps} -> 600", "background: white -> mlp"]
    assert base.changes_from(base.to_dict()) == []


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_a_spec_without_settings_keeps_the_recipe(recipe):
    assert resolve(recipe, JobSpec("a red cube")) == recipe  # the mesh defaults are the spec's too


def test_spec_settings_override_the_recipe():
    base = EmbeddedGuidance.recipe
    spec = JobSpec("a red cube", steps=7, resolution=48, guidance_scale=3.5, mesh_resolution=64, max_faces=500,
                   texture_size=256, refine_steps=30)
    assert resolve(base, spec).changes_from(base.to_dict()) == [
        f"schedule.steps: {base.schedule.steps} -> 7", f"guidance_scale: {base.guidance_scale} -> 3.5", "resolution: 32 -> 48",
        "mesh.resolution: 128 -> 64", "mesh.max_faces: 20000 -> 500", "mesh.texture_size: 1024 -> 256",
        "refine.steps: 0 -> 30",
    ]
    # zero is a setting, not a missing one
    assert resolve(base, JobSpec("a red cube", guidance_scale=0.0)).guidance_scale == 0.0
    assert resolve(replace(base, refine=replace(base.refine, steps=50)), JobSpec("a red cube", refine_steps=0)).refine.steps == 0
    for bad in (-1, 20001, 2.5, True):
        with pytest.raises(SpecError, match="refine_steps"):
            JobSpec("a red cube", refine_steps=bad).validate()


def test_the_views_setting_switches_view_blending_and_perp_neg_and_bad_values_are_named():
    from promptmesh.shared.spec import SpecError

    base = EmbeddedGuidance.recipe
    assert resolve(base, JobSpec("a red cube", views="perp-neg")).changes_from(base.to_dict()) == [
        "views.interpolate: False -> True", "views.perp_neg: False -> True"]
    assert resolve(base, JobSpec("a red cube", views="interpolated")).changes_from(base.to_dict()) == [
        "views.interpolate: False -> True"]
    assert resolve(base, JobSpec("a red cube", views="camera")).changes_from(base.to_dict()) == [
        "views.words: True -> False"]
    assert resolve(base, JobSpec("a red cube", views="hard")) == base
    with pytest.raises(SpecError, match="views: must be one of hard, interpolated, perp-neg, camera"):
        JobSpec.from_dict({"prompt": "a red cube", "views": "sideways"})


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
