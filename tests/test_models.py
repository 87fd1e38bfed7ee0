"""The model catalogue's downloads, against a Hugging Face Hub on loopback (tests/fake_hub.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub
from helpers import ServerProcess, free_port, small_spec, wait_for
from promptmesh.backend.models import CATALOGUE, REMOVED_FROM_HUB, candidates, sds_files
from promptmesh.shared.client import Client
from promptmesh.shared.errors import PromptMeshError


def repo_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sds_files_take_fp16_weights_where_a_component_has_them_and_never_the_safety_checker():
    names = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
             "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
             "scheduler/scheduler_config.json", "tokenizer/vocab.json", "v2-1_512-ema-pruned.ckpt"]
    assert sorted(sds_files(names)) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "scheduler/scheduler_config.json", "tokenizer/vocab.json"])


def test_a_first_job_on_sd21_downloads_it_from_a_mirror_reporting_bytes_then_runs(tiny_sd, tmp_path):
    """The first mirror is gone (404), the second serves the model: the job's progress says
    `downloading` with bytes done of the total, only what SDS needs is fetched, then it runs;
    a second job finds it cached and downloads nothing."""
    first, second = CATALOGUE["sd21"].repos[:2]
    # the UNet only as an fp16 variant, as the real mirrors hold it: loading must find the variant
    files = {k.replace("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"): v
             for k, v in repo_files(tiny_sd).items()}
    files["safety_checker/model.safetensors"] = b"\0" * 4096
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    wanted = sds_files(list(files))
    assert "safety_checker/model.safetensors" not in wanted
    with FakeHub({second: files}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_XET": "1"}
        server = ServerProcess(tmp_path / "data", env=env)
        try:
            with Client(server.endpoint) as c:
                spec = {**small_spec(tiny_sd), "model": "sd21", "steps": 2}
                events = wait_for(c, c.request("generate", spec=spec).job)
                assert events[-1].type == "done", events[-1].fields
                fetched = [(m.fields["done_bytes"], m.fields["total_bytes"]) for m in events  # bytes, named as such
                           if m.type == "progress" and m.fields["stage"] == "downloading" and m.fields["total_bytes"]]
                assert fetched and fetched[-1] == (sum(len(files[n]) for n in wanted),) * 2
                assert [d for d, _ in fetched] == sorted(d for d, _ in fetched)
                assert any(r.startswith(f"GET /api/models/{first}/") for r in hub.requests)  # tried first, gone
                got = {r.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.startswith("GET /" + second)}
                assert got == set(wanted)  # each needed file once, nothing else
                again = wait_for(c, c.request("generate", spec=spec).job)
                assert again[-1].type == "done"
                assert not [m for m in again if m.type == "progress" and m.fields["stage"] == "downloading"]
        finally:
            server.stop()


def generate_removed(model: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`promptmesh generate --model MODEL` as a user runs it, with an empty Hugging Face cache."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_XET": "1", **env}
    return subprocess.run([sys.executable, "-m", "promptmesh.backend.cli", "generate", "a red cube", "--model", model,
                           "--steps", "1", "-o", str(tmp_path / "cube.glb")], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_naming_sd21(proc: subprocess.CompletedProcess, model: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.strip().splitlines() if not line.endswith("...")]  # beside "loading..."
    assert said == [f"promptmesh: error: {model} was removed from the Hugging Face Hub in November 2025: use the "
                    "alias sd21 (Stable Diffusion 2.1 base, 512 px, from community mirrors) instead"], proc.stderr
    assert not (tmp_path / "cube.glb").exists() and not (tmp_path / "hub").exists()  # nothing fetched, nothing written


@pytest.mark.parametrize("model", ["stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2"])
def test_a_removed_hub_id_offline_gets_one_line_naming_the_alias(model, tmp_path):
    """Offline, the Hub's own advice was to download it first, which can no longer be done."""
    assert_one_line_naming_sd21(generate_removed(model, tmp_path, HF_HUB_OFFLINE="1"), model, tmp_path)


def test_a_removed_hub_id_without_a_network_gets_one_line_naming_the_alias(tmp_path):
    """No Hub to reach (a closed loopback port): it was a bare connection error."""
    model = "stabilityai/stable-diffusion-2-1"
    proc = generate_removed(model, tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert_one_line_naming_sd21(proc, model, tmp_path)


def test_a_removed_hub_id_online_gets_one_line_naming_the_alias_and_asks_the_hub_nothing(tiny_sd, tmp_path):
    """A Hub that answers (and 404s the removed repository): it was a download error."""
    model = "stabilityai/stable-diffusion-2-base"
    with FakeHub({CATALOGUE["sd21"].repos[0]: repo_files(tiny_sd)}) as hub:
        proc = generate_removed(model, tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        assert hub.requests == []
    assert_one_line_naming_sd21(proc, model, tmp_path)


def test_every_removed_id_is_refused_in_any_case_unless_a_copy_is_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    for model in [*REMOVED_FROM_HUB, "StabilityAI/Stable-Diffusion-2-1-Base"]:
        with pytest.raises(PromptMeshError, match=f"^{model} was removed .* use the alias sd21 ") as caught:
            candidates(model)
        assert caught.value.code == "MODEL"
    assert candidates("stabilityai/stable-diffusion-xl-base-1.0") == ("stabilityai/stable-diffusion-xl-base-1.0",)
    # a copy downloaded before the removal still loads from the cache
    snapshot = tmp_path / "models--stabilityai--stable-diffusion-2-1-base" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    assert candidates("stabilityai/stable-diffusion-2-1-base") == ("stabilityai/stable-diffusion-2-1-base",)
