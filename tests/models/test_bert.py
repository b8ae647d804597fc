"""BertModel on packed prompts: all-MiniLM-L6-v2 embeddings equal sentence-transformers' to
1e-5 for 200 varied sentences run as one packed batch; a tiny random BERT's hidden states equal
HF's padded, masked forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmserve.engine.tokenizer import load_tokenizer
from lmserve.models.bert import BertModel
from lmserve.pooling.config import read_sentence_transformers
from lmserve.pooling.pooler import pool

WORDS = ("river", "café", "quantum", "東京", "naïve", "🚀", "data", "the", "a", "ünïcödé",
         "lorem", "ipsum", "serve", "model", "token", "embedding", "Zürich", "ß", "—", "42")  # fmt: skip


def sentences(count: int) -> list[str]:
    """Varied lengths, from empty to far past the model's 256 tokens, with unicode."""
    gen = torch.Generator().manual_seed(0)
    out = ["", " ", "?"]
    while len(out) < count:
        n = int(torch.randint(1, 400 if len(out) % 25 == 0 else 40, (1,), generator=gen))
        picks = torch.randint(0, len(WORDS), (n,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in picks))
    return out


def load_bert(path: Path) -> BertModel:
    model = BertModel(json.loads((path / "config.json").read_text()))
    loaded = model.load_weights(load_file(path / "model.safetensors").items())
    assert loaded == {name for name, _ in model.named_parameters()}
    return model.eval()


def packed(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    flat = torch.tensor([t for seq in ids for t in seq])
    positions = torch.tensor([p for seq in ids for p in range(len(seq))])
    return flat, positions, [len(seq) for seq in ids]


def test_minilm_embeddings_equal_sentence_transformers(minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    layout = read_sentence_transformers(minilm_dir)
    assert layout is not None and layout.max_seq_length == 256
    tokenizer = load_tokenizer(minilm_dir)
    texts = sentences(200)
    ids = [tokenizer(t, truncation=True, max_length=layout.max_seq_length)["input_ids"]
           for t in texts]  # fmt: skip
    assert max(len(seq) for seq in ids) == 256 and min(len(seq) for seq in ids) == 2
    flat, positions, lens = packed(ids)
    with torch.no_grad():
        hidden = load_bert(minilm_dir)(flat, positions, lens)
    ours = torch.stack(pool(hidden, lens, layout.pooler))
    reference = SentenceTransformer(str(minilm_dir), device="cpu")
    expected = torch.from_numpy(reference.encode(texts, batch_size=64, normalize_embeddings=True))
    assert (ours - expected).abs().max().item() < 1e-5


def test_tiny_bert_hidden_states_equal_hf(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128)  # fmt: skip
    hf = tf.BertModel(config, add_pooling_layer=True).eval()
    hf.save_pretrained(tmp_path)
    ours = load_bert(tmp_path)  # the pooler head and position-id buffer are skipped
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (5, 17, 1, 30)]
    flat, positions, lens = packed(ids)
    with torch.no_grad():
        got = ours(flat, positions, lens)
        padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in ids], batch_first=True)
        mask = (torch.arange(padded.shape[1])[None, :] < torch.tensor(lens)[:, None]).long()
        expected = hf(input_ids=padded, attention_mask=mask).last_hidden_state[mask.bool()]
    assert (got - expected).abs().max().item() < 1e-5


def test_an_unknown_checkpoint_tensor_is_an_error(tmp_path: Path) -> None:
    model = BertModel({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 16,
                       "max_position_embeddings": 16})  # fmt: skip
    with pytest.raises(ValueError, match="classifier.weight"):
        model.load_weights([("classifier.weight", torch.zeros(2, 8))])
