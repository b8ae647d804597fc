"""YAML deploys, both of Ray Serve LLM's forms (llm_configs inline, and per-model files), through
Ray's own `serve run` and through `lmserve run`; each starts its own local Ray."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

pytest.importorskip("ray")

from tests.api.conftest import free_port  # noqa: E402


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until the deployment answers /v1/models; fails with the log if the process exits."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops `serve run` / `lmserve run`; killed if it has not exited in 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def write_config(tmp_path: Path, tiny: Path, per_model_file: bool, port: int) -> Path:
    model = {
        "model_loading_config": {"model_id": "tiny", "model_source": str(tiny)},
        "engine_kwargs": {"max_model_len": 256, "kv_cache_memory_gb": 0.02},
    }
    if per_model_file:
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(model))
        llm_configs: list = ["tiny.yaml"]
    else:
        llm_configs = [model]
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "llm",
                "route_prefix": "/",
                "import_path": "lmserve.serve:build_openai_app",
                "args": {"llm_configs": llm_configs},
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("per_model_file", [False, True], ids=["inline", "per-model-file"])
@pytest.mark.parametrize("runner", ["serve", "lmserve"])
def test_yaml_config_deploys(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], runner: str, per_model_file: bool
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_model_dirs["llama"], per_model_file, port)
    command = {
        "serve": [str(Path(sys.executable).parent / "serve"), "run", str(config)],
        "lmserve": [sys.executable, "-m", "lmserve.cli", "run", str(config)],
    }[runner]
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, tmp_path / "run.log")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4)
        assert reply.usage.completion_tokens == 4
    finally:
        interrupt(proc)


SEED_SERVER = """
from ray import serve
from lmserve.serve import LLMConfig, build_openai_app

llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-0.5b",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1,
            max_replicas=2,
        )
    ),
)

# Build and deploy the model
app = build_openai_app({"llm_configs": [llm_config]})
serve.run(app, blocking=True)
"""


def test_seed_server_snippet_runs(tmp_path: Path, smollm2_dir: Path) -> None:
    """Seed 000's Ray Serve LLM server, with lmserve.serve's import, the bundled model and no
    accelerator_type; queried the way the seed's client does."""
    script = tmp_path / "server.py"
    script.write_text(SEED_SERVER)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, "http://127.0.0.1:8000", tmp_path / "run.log")
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
        response = client.chat.completions.create(
            model="qwen-0.5b",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in response.choices[0].message.content
    finally:
        interrupt(proc)
