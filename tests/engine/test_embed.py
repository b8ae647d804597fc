"""LLM.embed / LLM.encode on the pooling runner: all-MiniLM-L6-v2 embeddings equal
sentence-transformers' for 200 varied prompts packed into steps, and the errors say what to do."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, PoolingParams
from tests.models.test_bert import sentences


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> LLM:
    return LLM(runner="pooling")  # no model: the bundled all-MiniLM-L6-v2


def test_embeddings_equal_sentence_transformers(embedder: LLM, minilm_dir) -> None:
    from sentence_transformers import SentenceTransformer

    texts = sentences(200)
    outputs = embedder.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
    ours = torch.tensor([o.outputs.embedding for o in outputs])
    reference = SentenceTransformer(str(minilm_dir), device="cpu")
    expected = torch.from_numpy(reference.encode(texts, batch_size=64, normalize_embeddings=True))
    assert ours.shape == (200, 384) and (ours - expected).abs().max().item() < 1e-5
    assert max(len(o.prompt_token_ids) for o in outputs) == 256  # the long ones, truncated
    assert not embedder.engine_core.has_unfinished_requests()


def test_steps_pack_prompts_under_the_token_budget(minilm_dir) -> None:
    llm = LLM(runner="pooling", max_num_batched_tokens=300)
    steps = []
    step = llm.engine_core.step

    def counted():
        outputs = step()
        steps.append((len(outputs), llm.engine_core.stats().num_step_tokens))
        return outputs

    llm.engine_core.step = counted
    texts = ["word " * n for n in (200, 90, 90, 10, 250)]
    outputs = llm.embed(texts, use_tqdm=False)
    lens = [len(o.prompt_token_ids) for o in outputs]
    assert sum(n for n, _ in steps) == 5 and all(tokens <= 300 for _, tokens in steps)
    assert sum(tokens for _, tokens in steps) == sum(lens)  # each prompt whole, once
    alone = llm.embed(texts[1:2], use_tqdm=False)[0]
    assert alone.outputs.embedding == pytest.approx(outputs[1].outputs.embedding, abs=1e-6)


def test_encode_and_pooling_params(embedder: LLM) -> None:
    (pooled,) = embedder.encode("Hello there", use_tqdm=False)
    assert pooled.outputs.data.shape == (384,)
    assert torch.linalg.norm(pooled.outputs.data).item() == pytest.approx(1.0, abs=1e-5)
    (raw,) = embedder.encode("Hello there", PoolingParams(normalize=False), use_tqdm=False)
    assert torch.allclose(torch.nn.functional.normalize(raw.outputs.data, dim=0),
                          pooled.outputs.data, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="not a Matryoshka model"):
        embedder.embed("Hi", PoolingParams(dimensions=64), use_tqdm=False)


def test_what_each_runner_refuses(embedder: LLM, tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="longer than the maximum model length of 256"):
        embedder.embed("word " * 400, use_tqdm=False)
    with pytest.raises(ValueError, match="does not generate"):
        embedder.generate("Hi", use_tqdm=False)
    assert not embedder.engine_core.has_unfinished_requests()
    generator = LLM(str(tiny_model_dirs["llama"]), max_model_len=64)
    with pytest.raises(ValueError, match="runner='pooling'"):
        generator.embed([{"prompt_token_ids": [1, 2]}], use_tqdm=False)
    with pytest.raises(ValueError, match="--runner pooling"):
        LLM(str(embedder.config.model.path), runner="generate")
    with pytest.raises(ValueError, match="has none: use --convert embed"):
        LLM(str(tiny_model_dirs["llama"]), task="classify")
    with pytest.raises(ValueError, match="classify needs a classifier"):
        embedder.classify("Hi", use_tqdm=False)


@pytest.mark.parametrize("keep", [None, -1, 5])
def test_batched_tokenization_matches_one_by_one(embedder: LLM, keep) -> None:
    processor = embedder.input_processor
    prompts = ["Hello there", {"prompt_token_ids": [101, 7592, 102]}, "word " * 300, "é 中"]
    if keep is None:
        prompts[2] = "word " * 30
    batched = processor.tokenize_many(prompts, keep)
    assert batched == [processor.tokenize_truncated(p, keep) for p in prompts]


def test_int8_embeddings_stay_close(embedder: LLM) -> None:
    """--quantization int8 quantizes an encoder's layers too: close to float32, not equal."""
    from lmserve.layers.int8_linear import Int8Linear

    quantized = LLM(runner="pooling", quantization="int8")
    model = quantized.engine_core.runner.model
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 36  # 6 layers x 6
    texts = sentences(40)[3:]
    exact = torch.tensor([o.outputs.embedding for o in embedder.embed(texts, use_tqdm=False)])
    close = torch.tensor([o.outputs.embedding for o in quantized.embed(texts, use_tqdm=False)])
    cosines = (exact * close).sum(dim=1)
    assert cosines.min().item() > 0.97 and cosines.mean().item() > 0.99
