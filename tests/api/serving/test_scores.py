"""/classify, /score and /rerank on `lmserve serve` with tiny random BERT classifiers behind
MiniLM's real tokenizer: a cross-encoder (one label) and a three-label classifier. Scores and
probabilities equal HF transformers' to 1e-5; rerank orders as the scores do; misuse is a 400."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.api.conftest import Server, start_server, stop_server

QUERY = "Where is the Eiffel Tower?"
DOCUMENTS = ["Bananas are yellow.", "The Eiffel Tower is in Paris.", "Paris is in France.",
             "Ünïcödé — 中文 🙂", "A very long document about nothing in particular. " * 8]  # fmt: skip


@pytest.fixture(scope="module")
def cross(tiny_pooling_dirs) -> Iterator[Server]:
    server = start_server(str(tiny_pooling_dirs["bert_cross"]), "--served-model-name", "cross")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def classes(tiny_pooling_dirs) -> Iterator[Server]:
    server = start_server(str(tiny_pooling_dirs["bert_classes"]), "--served-model-name", "cls")
    yield server
    stop_server(server)


def _hf(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_cross(tiny_pooling_dirs):
    model, tokenizer = _hf(tiny_pooling_dirs["bert_cross"])

    def score(a: str, b: str) -> float:
        with torch.no_grad():
            return model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0].sigmoid().item()

    return score


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_one_to_many_and_pairwise(cross: Server, hf_cross, path: str) -> None:
    answer = _post(cross, path, {"model": "cross", "text_1": QUERY, "text_2": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["model"] == "cross"
    assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
    assert all(d["object"] == "score" for d in body["data"])
    expected = [hf_cross(QUERY, d) for d in DOCUMENTS]
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    pairwise = _post(cross, path, {"text_1": ["a", "b"], "text_2": ["c", "d"]}).json()
    got = [d["score"] for d in pairwise["data"]]
    assert got == pytest.approx([hf_cross("a", "c"), hf_cross("b", "d")], abs=1e-5)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_by_score(cross: Server, hf_cross, path: str) -> None:
    scores = [hf_cross(QUERY, d) for d in DOCUMENTS]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    body = _post(cross, path, {"model": "cross", "query": QUERY, "documents": DOCUMENTS}).json()
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(
        [scores[i] for i in order], abs=1e-5
    )
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in order]
    assert body["model"] == "cross" and body["usage"]["total_tokens"] > 0
    # Cohere's shape: documents as objects, top_n, no documents back
    cohere = _post(cross, path, {"query": QUERY, "top_n": 2, "return_documents": False,
                                 "documents": [{"text": d} for d in DOCUMENTS]}).json()  # fmt: skip
    assert [r["index"] for r in cohere["results"]] == order[:2]
    assert all(r.get("document") is None for r in cohere["results"])


def test_classify_equals_hf(classes: Server, tiny_pooling_dirs) -> None:
    texts = ["I love it", "I hate it", "It is a chair."]
    answer = _post(classes, "/classify", {"model": "cls", "input": texts})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    model, tokenizer = _hf(tiny_pooling_dirs["bert_classes"])
    for text, item in zip(texts, body["data"], strict=True):
        with torch.no_grad():
            probs = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        assert item["probs"] == pytest.approx(probs.tolist(), abs=1e-5)
        assert item["num_classes"] == 3
        assert item["label"] == model.config.id2label[int(probs.argmax())]
    one = _post(classes, "/classify", {"input": texts[0], "activation": False}).json()
    with torch.no_grad():
        logits = model(**tokenizer(texts[0], return_tensors="pt")).logits[0]
    assert one["data"][0]["probs"] == pytest.approx(logits.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("which", "path", "body", "param", "says"),
    [("classes", "/score", {"text_1": "a", "text_2": "b"}, "model", "3 labels"),
     ("classes", "/v1/embeddings", {"input": "a"}, "model", "--convert embed"),
     ("cross", "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", "2 texts"),
     ("cross", "/rerank", {"query": "q", "documents": []}, "documents", "empty"),
     ("cross", "/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, "top_n", ""),
     ("cross", "/score", {"text_1": "a " * 600, "text_2": "b"}, "input", "truncate_prompt_tokens"),
     ("cross", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
      "model", "pooling model")],
    ids=["score-on-classifier", "embed-on-classifier", "mismatched-pairs", "no-documents",
         "negative-top-n", "too-long", "chat"],
)  # fmt: skip
def test_misuse_is_a_400_naming_the_field(request, which, path, body, param, says) -> None:
    server = request.getfixturevalue(which)
    answer = _post(server, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_truncation_and_invocations(cross: Server, hf_cross) -> None:
    long = "word " * 600
    cut = _post(cross, "/score", {"text_1": long, "text_2": "b", "truncate_prompt_tokens": -1})
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 512
    via = _post(cross, "/invocations", {"query": QUERY, "documents": DOCUMENTS[:2]}).json()
    assert via["results"][0]["index"] == 1  # rerank, recognized by its shape
    scored = _post(cross, "/invocations", {"text_1": "a", "text_2": "c"}).json()
    assert scored["data"][0]["score"] == pytest.approx(hf_cross("a", "c"), abs=1e-5)
