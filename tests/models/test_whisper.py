"""Whisper through `LLM`: greedy tokens equal HF's `generate` on the same converted tiny.en
weights for real speech, batched, windowed and preempted; cross blocks are freed with requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.audio.decode import SAMPLE_RATE, decode_audio
from lmserve.audio.windows import split_windows

GREEDY = SamplingParams(temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def windows(speech_dir: Path) -> list[np.ndarray]:
    """beckett.wav whole, and two_cities.wav (44 s, 48 kHz) cut into its two windows."""
    beckett = decode_audio((speech_dir / "beckett.wav").read_bytes())
    cities = decode_audio((speech_dir / "two_cities.wav").read_bytes())
    return [beckett, *(w.samples for w in split_windows(cities))]


def _hf_generate(whisper_dir: Path, windows: list[np.ndarray], **kwargs) -> list[list[int]]:
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    processor = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32)
    out = []
    for samples in windows:
        features = processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            out.append(model.eval().generate(features.input_features, **kwargs)[0].tolist())
    return out


@pytest.fixture(scope="module")
def hf_tokens(whisper_dir: Path, windows: list[np.ndarray]) -> list[list[int]]:
    """HF's greedy transcription of each window, one at a time."""
    return _hf_generate(whisper_dir, windows)


def _transcribe(llm: LLM, windows: list[np.ndarray]) -> list[list[int]]:
    prompts = [{"multi_modal_data": {"audio": (w, SAMPLE_RATE)}} for w in windows]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    eos = llm.get_tokenizer().eos_token_id
    for output in outputs:
        assert output.outputs[0].token_ids[-1] == eos and output.outputs[0].finish_reason == "stop"
    return [o.outputs[0].token_ids[:-1] for o in outputs]  # HF's generate drops the EOS


def _assert_nothing_held(llm: LLM) -> None:
    kv = llm.engine_core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_usable_blocks


def test_real_speech_batched_equals_hf(whisper_dir: Path, windows, hf_tokens) -> None:
    llm = LLM(str(whisper_dir), kv_cache_memory_gb=0.25)
    llm.step_hook = llm.engine_core.check_invariants
    text = (
        llm.generate(
            {"multi_modal_data": {"audio": (windows[0], SAMPLE_RATE)}}, GREEDY, use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    assert text.strip() == "Ever tried, ever failed. No matter, try again. Fail again. Fail better."
    assert len(hf_tokens[1]) > 50 and len(hf_tokens[2]) > 20  # both windows hold speech
    assert _transcribe(llm, windows) == hf_tokens  # three windows in one batch
    assert _transcribe(llm, windows[::-1]) == hf_tokens[::-1]
    _assert_nothing_held(llm)


def test_timestamps_follow_hfs_rules(whisper_dir: Path, windows, hf_tokens) -> None:
    """A decoder prompt without <|notimestamps|> decodes with timestamps, under the rules HF's
    generate(return_timestamps=True) applies, batched beside plain requests."""
    stamped = _hf_generate(whisper_dir, windows, return_timestamps=True)
    begin = 50363  # <|0.00|>
    for tokens in stamped:
        assert tokens[0] == begin and tokens[-1] > begin  # opens and closes with a timestamp
        assert sum(t > begin for t in tokens) >= 2
    llm = LLM(str(whisper_dir), kv_cache_memory_gb=0.25)
    llm.step_hook = llm.engine_core.check_invariants
    start_of_transcript = [50257]
    audio = [{"multi_modal_data": {"audio": (w, SAMPLE_RATE)}} for w in windows]
    mixed = [{**a, "prompt_token_ids": start_of_transcript} for a in audio] + audio
    outputs = llm.generate(mixed, GREEDY, use_tqdm=False)
    tokens = [o.outputs[0].token_ids[:-1] for o in outputs]
    assert tokens == stamped + hf_tokens


def test_preempted_requests_reencode_and_match_hf(whisper_dir: Path, windows, hf_tokens) -> None:
    """A cache for two requests' cross blocks (375 of 4 tokens each) and little more: the
    newest running request is preempted, gives up its cross blocks, and is encoded again."""
    llm = LLM(str(whisper_dir), block_size=4, num_kv_blocks=770, max_model_len=200)
    preempted = []

    def hook() -> None:
        llm.engine_core.check_invariants()
        preempted.append(llm.engine_core.scheduler.num_preemptions)

    llm.step_hook = hook
    assert _transcribe(llm, windows) == hf_tokens
    assert preempted[-1] > 0
    _assert_nothing_held(llm)


def test_what_whisper_refuses(whisper_dir: Path, tiny_chat_dir: Path, windows) -> None:
    llm = LLM(str(whisper_dir), kv_cache_memory_gb=0.25)
    with pytest.raises(ValueError, match="is a speech model: send audio"):
        llm.generate("Ever tried", GREEDY, use_tqdm=False)
    long_audio = np.zeros(31 * SAMPLE_RATE, dtype=np.float32)
    with pytest.raises(ValueError, match="at most 30 s: split it into windows"):
        llm.generate({"multi_modal_data": {"audio": long_audio}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="takes no images: it is a speech model"):
        llm.generate({"multi_modal_data": {"image": long_audio}}, GREEDY, use_tqdm=False)
    _assert_nothing_held(llm)
    with pytest.raises(ValueError, match="does not speed up Whisper"):
        LLM(str(whisper_dir), quantization="int8")
    text_llm = LLM(str(tiny_chat_dir))
    with pytest.raises(ValueError, match="takes no audio: it is a text model"):
        text_llm.generate({"multi_modal_data": {"audio": windows[0]}}, GREEDY, use_tqdm=False)


def test_multilingual_language_and_task_tokens_equal_hf(multilingual_whisper_dir: Path, windows):
    """A multilingual checkpoint (tiny, random): the decoder prompt HF's generate builds for a
    language and a task gives HF's tokens. (Not with timestamps: random weights run to the
    length limit, where HF's generate goes on decoding from the last timestamp, as it does for
    long-form audio; the endpoint decodes each window once. The timestamp rules are checked on
    real speech above.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(multilingual_whisper_dir)
    ids = tokenizer.convert_tokens_to_ids
    llm = LLM(str(multilingual_whisper_dir))
    for language, task in [("de", "translate"), ("fr", "transcribe")]:
        expected = _hf_generate(multilingual_whisper_dir, windows[:1], language=language, task=task)
        prompt = [ids(f"<|{t}|>") for t in ("startoftranscript", language, task, "notimestamps")]
        audio = {"multi_modal_data": {"audio": (windows[0], SAMPLE_RATE)}}
        output = llm.generate({**audio, "prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
        tokens = output[0].outputs[0].token_ids
        if tokens[-1] == tokenizer.eos_token_id:
            tokens = tokens[:-1]
        assert tokens == expected[0], (language, task)


def test_no_speech_probability_equals_hfs(whisper_dir: Path, windows) -> None:
    """RequestOutput.no_speech_prob: the raw probability of the no-speech token at the
    start-of-transcript position, as HF's model gives it; low on speech, high on silence."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    processor = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32)
    silence = np.zeros(5 * SAMPLE_RATE, dtype=np.float32)
    audio = [windows[0], silence]
    expected = []
    for samples in audio:
        features = processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            logits = model.eval()(
                features.input_features, decoder_input_ids=torch.tensor([[50257]])
            )
        expected.append(torch.softmax(logits.logits[0, 0], -1)[50361].item())  # <|nocaptions|>
    llm = LLM(str(whisper_dir), kv_cache_memory_gb=0.25)
    prompts = [{"multi_modal_data": {"audio": (a, SAMPLE_RATE)}} for a in audio]
    got = [o.no_speech_prob for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[0] < 0.5 < got[1]


def test_sampled_decoding_keeps_whispers_rules(whisper_dir: Path, windows) -> None:
    """Sampling at temperature 1 (seeded: reproducible) never yields a suppressed token, never
    opens with a begin-suppressed one, and with timestamps keeps them paired and
    non-decreasing, the first within max_initial_timestamp_index."""
    import json

    generation = json.loads((whisper_dir / "generation_config.json").read_text())
    suppressed = set(generation["suppress_tokens"])
    begin = generation["no_timestamps_token_id"] + 1
    llm = LLM(str(whisper_dir), kv_cache_memory_gb=0.25)
    audio = {"multi_modal_data": {"audio": (windows[1], SAMPLE_RATE)}}
    prompts = [{**audio, "prompt_token_ids": [50257]}] * 4 + [audio] * 4
    params = [SamplingParams(temperature=1.0, max_tokens=200, seed=i) for i in range(8)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert first == again and len({tuple(t) for t in first}) > 4  # seeded, and varied
    for i, tokens in enumerate(first):
        assert not suppressed & set(tokens)
        assert tokens[0] not in generation["begin_suppress_tokens"]
        if i >= 4:  # <|notimestamps|>: no timestamp rules (HF's and OpenAI's whisper apply none)
            continue
        stamps = [t for t in tokens if t >= begin]
        assert stamps == sorted(stamps) and tokens[0] <= begin + 50
        text_runs = "".join("t" if t >= begin else "x" for t in tokens if t != 50256)
        assert "ttt" not in text_runs and "xtx" not in text_runs  # timestamps come in pairs
