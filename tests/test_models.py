"""The model catalogue's downloads, against a Hugging Face Hub on loopback (tests/fake_hub.py)."""

from __future__ import annotations

from pathlib import Path

from fake_hub import FakeHub
from helpers import ServerProcess, small_spec, wait_for
from promptmesh.backend.models import CATALOGUE, sds_files
from promptmesh.shared.client import Client


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
                fetched = [(m.fields["step"], m.fields["total"]) for m in events
                           if m.type == "progress" and m.fields["stage"] == "downloading" and m.fields["total"]]
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
