"""Offline batch inference: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from lmserve.chat_template import image_placeholder, image_sources, render_chat
from lmserve.engine.args import create_engine_config
from lmserve.engine.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    BeamSearchParams,
    check_logprob_limit,
    step_params,
    top_candidates,
)
from lmserve.engine.core import build_engine_core
from lmserve.engine.generation_config import load_sampling_defaults
from lmserve.engine.input_processor import InputProcessor, PromptType
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.tokenizer import load_tokenizer
from lmserve.lora.request import LoRARequest
from lmserve.multimodal.media import MediaPolicy, load_images
from lmserve.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from lmserve.pooling.score import check_scorable, cosine, pair_up
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """vLLM's offline entry point over an in-process EngineCore. `model=None` is the bundled
    SmolLM2-135M-Instruct; every keyword is an engine argument with vLLM's name."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.config = create_engine_config(model, **engine_args)
        if self.config.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size runs engine cores behind `lmserve serve` (or AsyncEngine); "
                "LLM runs one core in this process: leave it at 1"
            )
        self.tokenizer = (
            load_tokenizer(self.config.model.path) if self.config.model.has_tokenizer else None
        )
        self.input_processor = InputProcessor(
            self.config.model,
            self.tokenizer,
            self.config.structured_output.backend,
            self.config.lora,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = build_engine_core(self.config)
        self._counter = itertools.count()
        # Called after every engine step (tests check block-pool invariants with it).
        self.step_hook: Callable[[], None] | None = None

    def _check_generates(self) -> None:
        if self.config.runner == "pooling":
            raise ValueError(
                f"{self.config.model.model} runs the pooling runner: it embeds (LLM.embed, "
                "LLM.encode) and does not generate; load a generative model to generate"
            )

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's LLM.reset_prefix_cache), e.g. between benchmarks."""
        self.engine_core.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (needs enable_sleep_mode=True): level 1 frees the KV cache (on CUDA
        the weights move to host memory), level 2 frees the weights too; wake_up() undoes it."""
        self.engine_core.sleep(level)

    def wake_up(self) -> None:
        self.engine_core.wake_up()

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's generation_config.json sampling defaults, as vLLM's --generation-config auto."""
        return SamplingParams(**load_sampling_defaults(self.config.model.path))

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """`lora_request`: one adapter for every prompt, or one (or None) per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        processed = [self.input_processor.tokenize_prompt(p) for p in prompts]
        return self._run(processed, sampling_params, use_tqdm, lora_request)

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """A pooling model's output per prompt (vLLM's LLM.encode): prompts packed whole into
        steps, one forward pass each. `truncate_prompt_tokens` keeps a prompt's first N tokens
        (-1: the context); without it, a prompt over max_model_len is a ValueError."""
        from lmserve.transfer import float32_tensor

        if self.config.runner != "pooling":
            raise ValueError(
                f"{self.config.model.model} runs the generate runner: embed with a pooling "
                "model (runner='pooling', e.g. the default LLM(runner='pooling'))"
            )
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        requests = [
            self.input_processor.make_pooling_request(str(next(self._counter)), p, params)
            for p in self.input_processor.tokenize_many(list(prompts), truncate_prompt_tokens)
        ]  # all checked before any is queued
        for request in requests:
            self.engine_core.add_request(request)
        prompt_ids = {r.req_id: r.prompt_token_ids for r in requests}
        results: dict[str, PoolingRequestOutput] = {}
        bar = tqdm(total=len(requests), desc="Pooled prompts", disable=not use_tqdm)
        try:
            while self.engine_core.has_unfinished_requests():
                for out in self.engine_core.step():
                    if out.pooled is None:
                        raise RuntimeError(
                            f"pooling request {out.req_id} failed ({out.finish_reason})"
                        )
                    data = float32_tensor(out.pooled.data, out.pooled.shape)
                    results[out.req_id] = PoolingRequestOutput(
                        out.req_id, PoolingOutput(data), list(prompt_ids[out.req_id])
                    )
                    bar.update(1)
        except BaseException:
            self.engine_core.abort_requests([r.req_id for r in requests])
            raise
        finally:
            bar.close()
        return [results[r.req_id] for r in requests]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (vLLM's LLM.embed)."""
        self._check_pools("embed")
        return [
            EmbeddingRequestOutput(
                out.request_id, EmbeddingOutput(out.outputs.data.tolist()), out.prompt_token_ids
            )
            for out in self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm)
        ]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (vLLM's LLM.classify), from a classifier
        (*ForSequenceClassification)."""
        self._check_pools("classify")
        return [
            ClassificationRequestOutput(
                out.request_id,
                ClassificationOutput(out.outputs.data.tolist()),
                out.prompt_token_ids,
            )
            for out in self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm)
        ]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """A score per pair (vLLM's LLM.score): `data_1` against each of `data_2`, or pairwise.
        A cross-encoder reads each pair together; an embedding model scores the cosine of the
        two embeddings."""
        pairs = pair_up(data_1, data_2)
        if self.config.pooler is None:
            raise ValueError(
                f"{self.config.model.model} runs the generate runner: score with a "
                "cross-encoder or an embedding model (runner='pooling')"
            )
        check_scorable(self.config.pooler.task, self.config.model.hf_config)
        if self.config.pooler.task == "classify":
            outputs = self.encode(
                [{"text": a, "text_pair": b} for a, b in pairs],
                truncate_prompt_tokens=truncate_prompt_tokens,
                use_tqdm=use_tqdm,
            )
            return [
                ScoringRequestOutput(
                    o.request_id, ScoringOutput(float(o.outputs.data[0])), o.prompt_token_ids
                )
                for o in outputs
            ]
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors = self.embed(texts, None, truncate_prompt_tokens, use_tqdm)
        embedded = dict(zip(texts, vectors, strict=True))
        scores = []
        for a, b in pairs:
            first, second = embedded[a], embedded[b]
            scores.append(
                ScoringRequestOutput(
                    f"{first.request_id}_{second.request_id}",
                    ScoringOutput(cosine(first.outputs.embedding, second.outputs.embedding)),
                    first.prompt_token_ids + second.prompt_token_ids,
                )
            )
        return scores

    def _check_pools(self, task: str) -> None:
        """This engine pools as `task` asks, or an error that says which model would."""
        pooler = self.config.pooler
        if self.config.runner != "pooling" or pooler is None:
            raise ValueError(
                f"{self.config.model.model} runs the generate runner: {task} with a pooling "
                "model (runner='pooling')"
            )
        if pooler.task != task:
            raise ValueError(
                f"{self.config.model.model} runs as a {pooler.task} model (convert="
                f"{pooler.task!r}); {task} needs "
                + ("an embedding model" if task == "embed" else "a classifier checkpoint")
            )

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: each prompt's `beam_width` best sequences, as HF's
        generate(num_beams=...) finds them. Every running beam of every prompt runs in the same
        step, sharing its prompt's blocks through the prefix cache."""
        self._check_generates()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        check_logprob_limit(params, self.config.model.max_logprobs)
        eos = self.input_processor.eos_token_id
        processed = [self.input_processor.tokenize_prompt(p) for p in prompts]
        if any(p.prompt_embeds is not None for p in processed):
            raise ValueError("beam search takes text or token-id prompts, not embeddings")
        searches = [BeamSearch(p.prompt_token_ids, params, eos) for p in processed]
        step = step_params(params)
        bar = tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm)
        while running := [search for search in searches if not search.done]:
            pending = [ids for search in running for ids in search.pending()]
            outputs = iter(
                self.generate(
                    [{"prompt_token_ids": ids} for ids in pending],
                    step,
                    use_tqdm=False,
                    lora_request=lora_request,
                )
            )
            for search in running:
                search.step(
                    [
                        top_candidates(next(outputs).outputs[0].logprobs[0], params.num_candidates)
                        for _ in search.running
                    ]
                )
            bar.update(1)
        bar.close()
        return [search.output(self.tokenizer) for search in searches]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (the server's renderer: text
        parts or strings, image parts for a vision-language model (URLs under the engine's
        media rules, or PIL images), tool calls, `continue_final_message`), then generate.
        What cannot be rendered raises ChatTemplateError, a ValueError that says why."""
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model.path} has no tokenizer, so it cannot chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        image_token = image_placeholder(self.tokenizer, self.config.model.hf_config)
        prompts = []
        for conversation in conversations:
            text = render_chat(
                self.tokenizer,
                list(conversation),
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
                image_token=image_token,
            )
            prompt: PromptType = text
            sources = image_sources(list(conversation))
            if sources:
                images = asyncio.run(load_images(sources, MediaPolicy.of(self.config.model)))
                prompt = {"prompt": text, "multi_modal_data": {"image": images}}
            prompts.append(self.input_processor.tokenize_prompt(prompt, add_special_tokens=False))
        return self._run(prompts, sampling_params, use_tqdm, lora_request)

    def _run(
        self, prompts: list, sampling_params: Any, use_tqdm: bool, lora_request: Any = None
    ) -> list[RequestOutput]:
        self._check_generates()
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        # Validate all before adding any, so a bad prompt leaves nothing half-queued.
        requests = []
        for prompt, params, lora in zip(prompts, params_list, loras, strict=True):
            request_id = str(next(self._counter))
            children = self.input_processor.make_requests(
                request_id, prompt, params, lora_request=lora
            )
            requests.append((request_id, prompt, params, children))
        for request_id, prompt, params, children in requests:
            self.output_processor.add_request(
                request_id,
                prompt.prompt,
                prompt.prompt_token_ids,
                params,
                [c.req_id for c in children],
                from_embeds=prompt.prompt_embeds is not None,
            )
            for child in children:
                self.engine_core.add_request(child)
        return self._run_engine(len(requests), use_tqdm)

    def _run_engine(self, num_requests: int, use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=num_requests, desc="Processed prompts", disable=not use_tqdm)
        num_output_tokens = 0
        try:
            while self.engine_core.has_unfinished_requests():
                core_outputs = self.engine_core.step()
                if self.step_hook is not None:
                    self.step_hook()
                done, to_abort = self.output_processor.process(core_outputs)
                if to_abort:
                    self.engine_core.abort_requests(to_abort)
                for output in done:
                    finished[output.request_id] = output
                    num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                if done and use_tqdm:
                    bar.update(len(done))
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s")
        except BaseException:
            # Interrupted (Ctrl-C, a failing step hook): leave no request queued or holding blocks.
            self.engine_core.abort_requests(self.output_processor.abort_all())
            raise
        finally:
            bar.close()
        return sorted(finished.values(), key=lambda o: int(o.request_id))
