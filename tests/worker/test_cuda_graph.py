"""Decode graphs: the size ladder, and the static-buffer bookkeeping of a captured step.

Without a GPU the bookkeeping runs with capture off (the forward runs eagerly on the static
buffers) and the Triton kernels in Triton's interpreter: padding rows, slot -1 and the copied
block tables must give exactly the eager tokens. With a GPU, real graphs are captured and
replayed.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lmserve import LLM  # noqa: E402
from lmserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from lmserve.engine.args import create_engine_config  # noqa: E402
from lmserve.models.loader import load_model  # noqa: E402
from lmserve.worker.cuda_graph import DecodeGraphs, capture_sizes  # noqa: E402
from lmserve.worker.model_runner import profile_forward  # noqa: E402
from tests.engine.test_llm import random_prompts, run_greedy  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_capture_sizes_and_padding() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    graphs = DecodeGraphs(torch.nn.Identity(), TorchRefBackend(torch.device("cpu")), 20, 3,
                          torch.device("cpu"), capture=False)  # fmt: skip
    assert [graphs.padded_size(n) for n in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]


class CountingGraphs(DecodeGraphs):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows_run: list[int] = []

    def run(self, input_ids, positions, slot_mapping, seq_lens, block_table):
        self.rows_run.append(len(seq_lens))
        return super().run(input_ids, positions, slot_mapping, seq_lens, block_table)


def _with_graphs(llm: LLM, capture: bool) -> CountingGraphs:
    runner = llm.engine_core.runner
    graphs = CountingGraphs(
        runner.model,
        runner.backend,
        llm.config.scheduler.max_num_seqs,
        runner.batch.block_table.shape[1],
        runner.device,
        capture=capture,
    )
    graphs.capture()
    runner.graphs = graphs
    return graphs


def test_static_buffer_steps_give_the_eager_tokens(tiny_model_dirs) -> None:
    """Decode steps of 3 then 2 rows run padded to 4 and 2, over blocks shared by a prefix."""
    path = str(tiny_model_dirs["llama"])
    shared = random_prompts([20], seed=5)[0]
    prompts = [shared + tail for tail in random_prompts([3, 9], seed=6)] + random_prompts([4])
    kwargs = dict(kv_cache_memory_gb=0.01, block_size=8, max_num_seqs=4)
    expected = run_greedy(LLM(path, **kwargs), prompts, num_new=6)
    llm = LLM(path, attention_backend="triton", **kwargs)
    llm.step_hook = llm.engine_core.check_invariants
    graphs = _with_graphs(llm, capture=torch.cuda.is_available())
    assert run_greedy(llm, prompts, num_new=6) == expected
    assert run_greedy(llm, prompts[1:], num_new=6) == expected[1:]  # prefix-cache hits too
    assert 3 in graphs.rows_run and 2 in graphs.rows_run


def test_profile_forward_covers_the_largest_step_and_unbinds(tiny_model_dirs) -> None:
    config = create_engine_config(
        str(tiny_model_dirs["qwen3"]), max_model_len=32, max_num_batched_tokens=80
    )
    model = load_model(config.model, torch.device("cpu"))
    seen: list[tuple[int, ...]] = []
    hook = model.model.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    profile_forward(model, TorchRefBackend(torch.device("cpu")), config, torch.device("cpu"))
    hook.remove()
    assert seen == [(80, config.model.hf_config["hidden_size"])]  # rows of 32, 32 and 16
    assert all(layer.kv_cache is None for layer in model.attention_layers())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gpu_cuda_graphs_match_eager(tiny_model_dirs, kind: str) -> None:
    path = str(tiny_model_dirs[kind])
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    kwargs = dict(dtype="float32", kv_cache_memory_gb=0.01, max_num_seqs=8)
    eager = run_greedy(LLM(path, enforce_eager=True, **kwargs), prompts)
    llm = LLM(path, **kwargs)
    assert llm.engine_core.runner.graphs is not None
    assert run_greedy(llm, prompts) == eager
    cpu = run_greedy(LLM(path, device="cpu", kv_cache_memory_gb=0.01), prompts)
    assert eager == cpu
