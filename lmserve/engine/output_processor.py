"""Engine-core outputs -> RequestOutputs: incremental detokenization, stop strings, logprobs, and
the gathering of a request's `n` samples (each its own engine request) into one output."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lmserve.engine.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from lmserve.outputs import CompletionOutput, Logprob, RequestOutput
from lmserve.sampling_params import SamplingParams


@dataclass
class _Sample:
    """One of a request's n samples, as the engine core sees it (one child request)."""

    index: int
    params: SamplingParams
    decoder: Any  # tokenizers DecodeStream, or None without a tokenizer
    output: CompletionOutput
    stop_checked_upto: int = 0  # text before this index has been searched for stop strings
    undecoded: list[int] = field(default_factory=list)  # tokens whose bytes are not text yet
    undecoded_at: int = 0  # where they start in the output's token_ids


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, _Sample]  # child req id -> sample
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    no_speech_prob: float | None = None
    pending_children: set[str] = field(default_factory=set)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._parent_of: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        child_ids: list[str],
        from_embeds: bool = False,
    ) -> None:
        """`from_embeds`: the prompt came as embeddings, its ids are placeholders (so the
        detokenizer starts without the prompt's tail)."""
        context = [] if from_embeds else prompt_token_ids
        samples = {
            child: _Sample(i, params, self._decoder(params, context), _empty_output(i, params))
            for i, child in enumerate(child_ids)
        }
        state = _RequestState(request_id, prompt, prompt_token_ids, params, samples)
        state.pending_children = set(child_ids)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self._requests[request_id] = state
        self._parent_of.update(dict.fromkeys(child_ids, request_id))

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def process(
        self, outputs: list[EngineCoreOutput], snapshots: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's engine outputs. Returns RequestOutputs (every finished request, and
        with `snapshots` a cumulative snapshot of each unfinished request that changed) and child
        ids to abort in the core because a stop string ended them."""
        to_abort: list[str] = []
        changed: dict[str, _RequestState] = {}
        for out in outputs:
            parent_id = self._parent_of.get(out.req_id)
            if parent_id is None:
                continue
            state = self._requests[parent_id]
            sample = state.samples[out.req_id]
            state.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(self._logprob_dicts(out.prompt_logprobs))
            if out.no_speech_prob is not None:
                state.no_speech_prob = out.no_speech_prob
            stopped_by_string = self._update_sample(sample, out)
            if stopped_by_string and out.finish_reason is None:
                to_abort.append(out.req_id)
            if sample.output.finish_reason is not None:
                state.pending_children.discard(out.req_id)
                self._parent_of.pop(out.req_id, None)
            changed[parent_id] = state
        results = []
        for state in changed.values():
            if not state.pending_children:
                results.append(self._finish(state))
            elif snapshots:
                results.append(self._snapshot(state))
        return results, to_abort

    def _snapshot(self, state: _RequestState) -> RequestOutput:
        """A copy of an unfinished request's progress. Text that could still turn out to be the
        start of a stop string is held back, so streamed text never has to be taken back."""
        outputs = []
        for sample in state.samples.values():
            out = sample.output
            text = out.text
            if out.finish_reason is None and sample.params.stop_strings:
                holdback = max(len(s) for s in sample.params.stop_strings) - 1
                text = text[: max(0, len(text) - holdback)]
            outputs.append(
                replace(
                    out,
                    text=text,
                    token_ids=list(out.token_ids),
                    logprobs=None if out.logprobs is None else list(out.logprobs),
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=outputs,
            finished=False,
            num_cached_tokens=state.num_cached_tokens,
            no_speech_prob=state.no_speech_prob,
        )

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its child ids for the core to abort."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return []
        for child in state.samples:
            self._parent_of.pop(child, None)
        return list(state.samples)

    def abort_all(self) -> list[str]:
        """Forget every request; returns all their child ids."""
        return [child for request_id in list(self._requests) for child in self.abort(request_id)]

    def _finish(self, state: _RequestState) -> RequestOutput:
        del self._requests[state.request_id]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=[s.output for s in state.samples.values()],
            finished=True,
            num_cached_tokens=state.num_cached_tokens,
            no_speech_prob=state.no_speech_prob,
        )

    def _update_sample(self, sample: _Sample, out: EngineCoreOutput) -> bool:
        """Append tokens and text; True when a stop string ended the sample."""
        output, params = sample.output, sample.params
        for i, token_id in enumerate(out.new_token_ids):
            output.token_ids.append(token_id)
            if out.logprobs is not None and output.logprobs is not None:
                entry = self._logprob_dicts([out.logprobs[i]])[0]
                output.logprobs.append(entry)
                output.cumulative_logprob = (output.cumulative_logprob or 0.0) + out.logprobs[
                    i
                ].logprobs[0]
            is_last = i == len(out.new_token_ids) - 1
            stop_token = is_last and out.finish_reason is FinishReason.STOP
            if sample.decoder is not None and not (
                stop_token and not params.include_stop_str_in_output
            ):
                text = self._step_decoder(sample, token_id)
                if text:
                    output.text += text
                    sample.undecoded.clear()
                else:
                    if not sample.undecoded:
                        sample.undecoded_at = len(output.token_ids) - 1
                    sample.undecoded.append(token_id)
            if self._check_stop_strings(sample):
                return True
        if out.finish_reason is not None:
            if sample.undecoded:
                output.text += self._flush(sample)
            output.finish_reason = out.finish_reason.value
            output.stop_reason = out.stop_reason
        return False

    def _flush(self, sample: _Sample) -> str:
        """The text of tokens held back as an unfinished UTF-8 sequence when the sample ends
        (max_tokens cut a character): U+FFFD for the partial bytes, as vLLM sends, so the text
        and token_ids still agree. Decoded after a few tokens of context, so a leading space
        is kept."""
        pending, start = sample.undecoded, sample.undecoded_at
        done = sample.output.token_ids[max(0, start - 4) : start]
        skip = sample.params.skip_special_tokens
        with_context = self.tokenizer.decode(done + pending, skip_special_tokens=skip)
        context = self.tokenizer.decode(done, skip_special_tokens=skip)
        if with_context.startswith(context):
            return with_context[len(context) :]
        return self.tokenizer.decode(pending, skip_special_tokens=skip)

    def _check_stop_strings(self, sample: _Sample) -> bool:
        output, params = sample.output, sample.params
        if not params.stop_strings or len(output.token_ids) <= params.min_tokens:
            return False
        longest = max(len(s) for s in params.stop_strings)
        start = max(0, sample.stop_checked_upto - longest + 1)
        found = [(i, s) for s in params.stop_strings if (i := output.text.find(s, start)) >= 0]
        sample.stop_checked_upto = len(output.text)
        if not found:
            return False
        index, stop = min(found)
        end = index + len(stop) if params.include_stop_str_in_output else index
        output.text = output.text[:end]
        output.finish_reason = FinishReason.STOP.value
        output.stop_reason = stop
        return True

    def _decoder(self, params: SamplingParams, prompt_token_ids: list[int]) -> Any:
        if self.tokenizer is None:
            return None
        from tokenizers.decoders import DecodeStream

        # Primed with the prompt's tail so the first token's leading space decodes as in context;
        # a tail that ends inside a character (byte-fallback pieces) would put the prompt's own
        # text in the output, so the shortest tail of 4 to 24 tokens that decodes whole is used.
        tail: list[int] = []
        for length in range(min(len(prompt_token_ids), 4), min(len(prompt_token_ids), 24) + 1):
            candidate = prompt_token_ids[-length:]
            if "\ufffd" not in self.tokenizer.decode(candidate):
                tail = candidate
                break
        return DecodeStream(ids=tail, skip_special_tokens=params.skip_special_tokens)

    def _step_decoder(self, sample: _Sample, token_id: int) -> str | None:
        """The stream's text for one more token. tokenizers refuses a token that changes how
        the text before it decodes ("Invalid prefix"); the stream then restarts from it."""
        from tokenizers.decoders import DecodeStream

        try:
            return sample.decoder.step(self.tokenizer._tokenizer, token_id)
        except Exception as exc:
            if "Invalid prefix" not in str(exc):
                raise
            sample.decoder = DecodeStream(skip_special_tokens=sample.params.skip_special_tokens)
            return sample.decoder.step(self.tokenizer._tokenizer, token_id)

    def _logprob_dicts(self, entries: list[TokenLogprobs]) -> list[dict[int, Logprob]]:
        dicts = []
        for entry in entries:
            d: dict[int, Logprob] = {}
            for j, (token_id, logprob) in enumerate(
                zip(entry.token_ids, entry.logprobs, strict=True)
            ):
                if token_id in d:
                    continue
                rank = entry.rank if j == 0 else j
                d[token_id] = Logprob(logprob, rank, self._decode_one(token_id))
            dicts.append(d)
        return dicts

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])


def _empty_output(index: int, params: SamplingParams) -> CompletionOutput:
    return CompletionOutput(
        index=index,
        text="",
        token_ids=[],
        cumulative_logprob=None,
        logprobs=[] if params.logprobs is not None else None,
    )
