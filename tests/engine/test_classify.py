"""LLM.classify / LLM.score and decoders on the pooling runner, against HF transformers on the
same tiny random weights: BERT classifiers (three labels; one, a cross-encoder read as sentence
pairs), a Qwen2 classifier, and a Qwen2 causal LM embedding with its last token."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, PoolingParams

TEXTS = [
    "The weather is lovely today.",
    "I did not enjoy that film at all",
    "ok",
    "Stock markets fell sharply after the announcement, dragging tech shares down with them.",
    "Ünïcödé text — with dashes, émojis 🙂 and 中文.",
]
QUERY = "Where is the Eiffel Tower?"
DOCUMENTS = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "Paris is in France."]


def _hf(path, cls_name: str):
    import transformers as tf

    return getattr(tf, cls_name).from_pretrained(path, dtype=torch.float32).eval()


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ["bert_classes", "qwen2_classes"])
def test_classify_equals_hf(tiny_pooling_dirs, name) -> None:
    path = tiny_pooling_dirs[name]
    llm = LLM(str(path))  # a *ForSequenceClassification checkpoint: pooling, classify
    assert llm.config.runner == "pooling" and llm.config.pooler.task == "classify"
    outputs = llm.classify(TEXTS, use_tqdm=False)
    raw = llm.classify(TEXTS, PoolingParams(activation=False), use_tqdm=False)
    model = _hf(path, "AutoModelForSequenceClassification")
    tokenizer = _tokenizer(path)
    for text, out, logits_out in zip(TEXTS, outputs, raw, strict=True):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        assert out.outputs.num_classes == 3
        assert torch.tensor(logits_out.outputs.probs) == pytest.approx(logits, abs=1e-5)
        assert torch.tensor(out.outputs.probs) == pytest.approx(logits.softmax(-1), abs=1e-5)
    assert not llm.engine_core.has_unfinished_requests()
    with pytest.raises(ValueError, match="3 labels: use /classify"):
        llm.score(QUERY, DOCUMENTS, use_tqdm=False)
    with pytest.raises(ValueError, match="an embedding model"):
        llm.embed("Hi", use_tqdm=False)


def test_cross_encoder_scores_equal_hf(tiny_pooling_dirs) -> None:
    path = tiny_pooling_dirs["bert_cross"]
    llm = LLM(str(path), task="score")
    scores = llm.score(QUERY, DOCUMENTS, use_tqdm=False)
    pairwise = llm.score([QUERY, "Bananas?", QUERY], DOCUMENTS, use_tqdm=False)
    model = _hf(path, "BertForSequenceClassification")
    tokenizer = _tokenizer(path)

    def expected(a: str, b: str) -> float:
        with torch.no_grad():
            return model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0].sigmoid().item()

    assert [s.outputs.score for s in scores] == pytest.approx(
        [expected(QUERY, d) for d in DOCUMENTS], abs=1e-5
    )
    assert pairwise[1].outputs.score == pytest.approx(expected("Bananas?", DOCUMENTS[1]), abs=1e-5)
    encoded = tokenizer(QUERY, DOCUMENTS[0])["input_ids"]
    assert scores[0].prompt_token_ids == encoded  # [CLS] query [SEP] document [SEP]
    with pytest.raises(ValueError, match="text_1 has 2 texts and text_2 3"):
        llm.score(["a", "b"], DOCUMENTS, use_tqdm=False)


def test_a_decoder_embeds_with_its_last_token(tiny_pooling_dirs) -> None:
    path = tiny_pooling_dirs["qwen2_causal"]
    llm = LLM(str(path), convert="embed", max_num_batched_tokens=64)
    assert llm.config.pooler.pooling_type == "LAST" and llm.config.pooler.normalize
    outputs = llm.embed(TEXTS, use_tqdm=False)  # several steps, several per step
    model = _hf(path, "Qwen2Model")
    tokenizer = _tokenizer(path)
    for text, out in zip(TEXTS, outputs, strict=True):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(hidden, dim=0)
        assert torch.tensor(out.outputs.embedding) == pytest.approx(expected, abs=1e-5)
    mean = LLM(str(path), convert="embed", pooler_config={"pooling_type": "MEAN"})
    (out,) = mean.embed(TEXTS[3], use_tqdm=False)
    with torch.no_grad():
        hidden = model(**tokenizer(TEXTS[3], return_tensors="pt")).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    assert torch.tensor(out.outputs.embedding) == pytest.approx(expected, abs=1e-5)
    # an embedding model scores by cosine
    (score,) = llm.score(TEXTS[0], TEXTS[1], use_tqdm=False)
    a, b = (torch.tensor(o.outputs.embedding) for o in outputs[:2])
    assert score.outputs.score == pytest.approx(torch.dot(a, b).item(), abs=1e-5)
    with pytest.raises(ValueError, match="--runner pooling"):
        LLM(str(tiny_pooling_dirs["qwen2_classes"]), runner="generate")


@pytest.mark.parametrize("family", ["Roberta", "XLMRoberta"])
def test_roberta_family_equals_hf(tmp_path, family) -> None:
    """RoBERTa / XLM-R: positions after the padding id, one token type; a classifier with its
    own head and an encoder pooled at its first token."""
    import transformers as tf

    config = getattr(tf, f"{family}Config")(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=80, type_vocab_size=1, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(3)
    classifier = getattr(tf, f"{family}ForSequenceClassification")(config).eval()
    classifier.save_pretrained(tmp_path / "cls")
    encoder = getattr(tf, f"{family}Model")(config, add_pooling_layer=False).eval()
    encoder.save_pretrained(tmp_path / "enc")
    gen = torch.Generator().manual_seed(4)
    prompts = [[0, *torch.randint(3, 300, (n,), generator=gen).tolist(), 2] for n in (3, 40, 76)]
    probs = LLM(str(tmp_path / "cls")).classify(
        [{"prompt_token_ids": p} for p in prompts], use_tqdm=False
    )
    embeds = LLM(str(tmp_path / "enc")).embed(
        [{"prompt_token_ids": p} for p in prompts], use_tqdm=False
    )
    for ids, prob, embedded in zip(prompts, probs, embeds, strict=True):
        with torch.no_grad():
            logits = classifier(input_ids=torch.tensor([ids])).logits[0]
            first = encoder(input_ids=torch.tensor([ids])).last_hidden_state[0, 0]
        assert torch.tensor(prob.outputs.probs) == pytest.approx(logits.softmax(-1), abs=1e-5)
        expected = torch.nn.functional.normalize(first, dim=0)
        assert torch.tensor(embedded.outputs.embedding) == pytest.approx(expected, abs=1e-5)
