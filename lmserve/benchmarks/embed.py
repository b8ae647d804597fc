"""Embedding throughput and latency: `LLM.embed` over N sentences, and one sentence at a time.

`--peer st` runs the same sentences through sentence-transformers' `encode` on the same model
directory and dtype in the same process (its default batching: batches of 32, sorted by
length), and prints the ratios. Sentences are random words from the model's own vocabulary, 8 to 128 words
each, so both engines see the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help=f"{MODEL_HELP}; default: the bundled all-MiniLM-L6-v2"
    )
    add_engine_cli_args(parser)
    parser.set_defaults(runner="pooling")
    parser.add_argument("--num-sentences", type=int, default=1000, help="sentences embedded")
    parser.add_argument("--min-words", type=int, default=8, help="shortest sentence, in words")
    parser.add_argument("--max-words", type=int, default=128, help="longest sentence, in words")
    parser.add_argument(
        "--latency-runs", type=int, default=50, help="single-sentence requests timed for the p50"
    )
    parser.add_argument(
        "--peer",
        choices=["none", "st"],
        default="none",
        help="st: also run sentence-transformers on the same sentences, and print the ratios",
    )
    parser.add_argument(
        "--peer-batch-size", type=int, default=32, help="sentence-transformers' batch"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Time lmserve (and the peer); one JSON line per engine, then one with the ratios."""
    llm = LLM(args.model, **engine_kwargs_from_cli(args))
    sentences = _sentences(llm.get_tokenizer(), args)
    single = sentences[: args.latency_runs]

    def embed(batch: list[str]) -> np.ndarray:  # cut to the context, as sentence-transformers
        outputs = llm.embed(batch, truncate_prompt_tokens=-1, use_tqdm=False)
        return np.array([o.outputs.embedding for o in outputs])

    results: dict[str, Any] = {
        "lmserve": _measure("lmserve", embed, sentences, single, llm.config.model.dtype)
    }
    print(json.dumps(results["lmserve"]["report"]), flush=True)
    if args.peer == "st":
        from sentence_transformers import SentenceTransformer

        path, device, dtype = llm.config.model.path, llm.config.device, llm.config.model.dtype
        del llm
        gc.collect()
        torch.manual_seed(args.seed)
        # in lmserve's dtype, so a bfloat16 run is compared with a bfloat16 peer
        model = SentenceTransformer(
            str(path), device=device, model_kwargs={"torch_dtype": getattr(torch, dtype)}
        )

        def st_embed(batch: list[str]) -> np.ndarray:
            return model.encode(
                batch,
                batch_size=args.peer_batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
            )

        results["st"] = _measure("sentence-transformers", st_embed, sentences, single, dtype)
        print(json.dumps(results["st"]["report"]), flush=True)
        ours, theirs = results["lmserve"], results["st"]
        summary = {
            "ratio_sentences_per_s": round(
                ours["report"]["sentences_per_s"] / theirs["report"]["sentences_per_s"], 3
            ),
            "ratio_single_p50": round(
                ours["report"]["single_p50_ms"] / theirs["report"]["single_p50_ms"], 3
            ),
            "max_abs_diff": float(np.abs(ours["vectors"] - theirs["vectors"]).max()),
            # both normalized: a quantized run's fidelity
            "min_cosine": float((ours["vectors"] * theirs["vectors"]).sum(axis=1).min()),
        }
        results["summary"] = summary
        print(json.dumps(summary), flush=True)
    return results


def _sentences(tokenizer: Any, args: argparse.Namespace) -> list[str]:
    """Random sentences of whole words the tokenizer knows (no subword pieces)."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) >= 3)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_words, args.max_words + 1, size=args.num_sentences)
    return [" ".join(rng.choice(words, size=n)).capitalize() + "." for n in lengths]


def _measure(
    name: str,
    embed: Callable[[list[str]], np.ndarray],
    sentences: list[str],
    single: list[str],
    dtype: str,
) -> dict[str, Any]:
    embed(sentences[:8])  # warm-up
    start = time.perf_counter()
    vectors = embed(sentences)
    elapsed = time.perf_counter() - start
    latencies = []
    for sentence in single:
        begin = time.perf_counter()
        embed([sentence])
        latencies.append(time.perf_counter() - begin)
    report = {
        "engine": name,
        "num_sentences": len(sentences),
        "elapsed_s": round(elapsed, 3),
        "sentences_per_s": round(len(sentences) / elapsed, 2),
        "single_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "single_p90_ms": round(float(np.percentile(latencies, 90)) * 1000, 2),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
    }
    return {"report": report, "vectors": vectors}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))
