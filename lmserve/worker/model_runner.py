"""One step of the model: SchedulerOutput -> tensors -> forward -> logits (execute), then logits ->
sampled tokens (sample)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmserve.attention.backend import (
    AttentionBackend,
    CommonAttentionMetadata,
    get_backend,
    ranks,
    ranks_from_end,
)
from lmserve.config import EngineConfig
from lmserve.core.request import RequestFailed
from lmserve.core.scheduler_output import GrammarBitmask, SampledTokens, SchedulerOutput
from lmserve.engine.messages import PromptEmbeds, TokenLogprobs
from lmserve.forward_context import set_forward_context
from lmserve.layers.cross_attention import CrossBlocks, CrossLayout
from lmserve.layers.tensor_parallel import TensorParallel
from lmserve.lora.layers import LoRAMapping
from lmserve.lora.manager import LoRAManager
from lmserve.models.loader import load_model, torch_dtype
from lmserve.sample.sampler import Sampler, SamplerOutput, gather_logprobs
from lmserve.structured_output.apply import apply_grammar_bitmask
from lmserve.transfer import float32_tensor, to_device, to_host
from lmserve.worker.cpu_allocator import keep_freed_memory_mapped, release_free_memory
from lmserve.worker.cuda_graph import DecodeGraphs
from lmserve.worker.draft_runner import DraftRunner
from lmserve.worker.host_memory import check_fits
from lmserve.worker.image_rows import ImageRows
from lmserve.worker.input_batch import InputBatch
from lmserve.worker.kv_cache import (
    allocate_kv_caches,
    cuda_kv_budget_bytes,
    num_blocks_from_budget,
)
from lmserve.worker.sampling_inputs import build_sampling_metadata
from lmserve.worker.sleep_mode import put_to_sleep, wake_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInputs:
    req_ids: list[str]  # batch order
    rows: np.ndarray  # [num_reqs] input-batch row of each request
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    common: CommonAttentionMetadata
    sample_mask: np.ndarray  # [num_reqs] True where the scheduler says the request samples
    num_drafts: np.ndarray  # [num_reqs] guessed tokens its query ends with (speculative decoding)
    # (step token indices, their embeddings) where a prompt came as embeddings, or images are
    prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    rope_positions: torch.Tensor | None = None  # [3, num_tokens]: an M-RoPE model's


@dataclass(frozen=True)
class _ExecutedStep:
    """What `execute()` leaves for `sample()`."""

    inputs: StepInputs
    hidden: torch.Tensor  # [num_tokens, hidden]
    sample_idx: np.ndarray  # batch positions that sample
    # logits rows per sampling request: 1, or 1 + its guesses (one per position checked)
    num_rows: np.ndarray
    logits: torch.Tensor | None  # [num_rows.sum(), vocab]
    no_speech: dict[str, float]  # Whisper requests whose start-of-transcript ran this step


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        device: torch.device,
        *,
        graphs: DecodeGraphs | None = None,
        lora: LoRAManager | None = None,
        draft: DraftRunner | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.num_blocks = kv_caches[0].shape[1]  # every backend's layout: [2, num_blocks, ...]
        self._kv_shape, self._kv_dtype = tuple(kv_caches[0].shape), kv_caches[0].dtype
        self.backend = backend
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = config.model.vocab_size
        max_len = config.scheduler.max_model_len
        self.batch = InputBatch(config.scheduler.max_num_seqs, max_len, _max_blocks_per_seq(config))
        generator = torch.Generator(device=device).manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self._bind_kv_caches()
        self._executed: _ExecutedStep | None = None
        self._prompt_embeds: dict[str, torch.Tensor] = {}  # req id -> [prompt len, hidden]
        # encoder-decoder models: each request's cross blocks, and the step's windows to encode
        self._num_encoder_tokens = config.model.num_encoder_tokens
        self._cross: dict[str, CrossBlocks] = {}
        self._sot: dict[str, int] = {}  # prompt position of each one's start-of-transcript
        self._to_encode: list[tuple[torch.Tensor, CrossBlocks]] = []
        # vision-language models: the images requests need, encoded once
        self.images = ImageRows(model, config, device) if hasattr(model, "embed_images") else None
        self.lora = lora
        self.draft = draft  # speculative decoding's draft model, guessing after each step
        self.graphs = graphs
        if graphs is not None:
            graphs.capture()

    @classmethod
    def load(cls, config: EngineConfig, tp: TensorParallel | None = None) -> ModelRunner:
        """Load the model, size the KV cache from the budget, allocate it. `tp`: this rank's
        share of a tensor-parallel model: its slices of the weights, its KV heads, its share
        of a CPU budget, and the block count every rank agrees on (the fewest)."""
        device = torch.device(config.device)
        if device.type == "cpu":
            if tp is None or tp.rank == 0:  # (the whole model's weights, once)
                check_fits(config)
            keep_freed_memory_mapped()
        torch.manual_seed(config.model.seed)
        model = load_model(config.model, device, tp=tp)
        kv_model = config.model
        if tp is not None:
            kv_model = dataclasses.replace(kv_model, hf_config=tp.shard_config(kv_model.hf_config))
        draft_model = DraftRunner.load_model(config, device) if config.draft else None
        lora = LoRAManager(model, config.model, config.lora) if config.lora else None
        dtype = torch_dtype(config.model.dtype)
        backend = get_backend(config.attention_backend, device)
        num_blocks = config.cache.num_kv_blocks
        if num_blocks is None:
            # (an encoder-decoder's profile would need encoder inputs: it takes the fixed budget)
            if (
                device.type == "cuda"
                and config.cache.kv_cache_memory_gb is None
                and not config.model.num_encoder_tokens
            ):
                torch.cuda.reset_peak_memory_stats(device)
                profile_forward(model, backend, config, device)
                torch.cuda.synchronize(device)
                budget = cuda_kv_budget_bytes(config.cache, device)
            else:
                budget = config.cache.kv_cache_bytes // (1 if tp is None else tp.size)
            extra = DraftRunner.bytes_per_block(config) if config.draft else 0
            num_blocks = num_blocks_from_budget(kv_model, config.cache, dtype, budget, extra)
        if tp is not None:
            num_blocks = tp.min_over_ranks(num_blocks)
        shape = backend.kv_cache_shape(
            num_blocks, config.cache.block_size, kv_model.num_kv_heads, kv_model.head_dim
        )
        caches = allocate_kv_caches(kv_model, shape, config.cache.block_size, dtype, device)
        graphs = _decode_graphs(config, model, backend, device)
        draft = None
        if draft_model is not None:
            draft = DraftRunner(config, draft_model, num_blocks, device)
        return cls(config, model, caches, backend, device, graphs=graphs, lora=lora, draft=draft)

    # ---- sleep mode -------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Free the KV cache and, on CUDA, move the weights to host memory (level 1); or free
        the weights too (level 2). The engine must be idle: the cache's contents are lost."""
        self.graphs = None  # captured against the tensors freed here
        put_to_sleep(self.model, level, self.device)  # level 2: wake_up builds the model again
        self.kv_caches = []
        if self.draft is not None:
            self.draft.sleep(level)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            release_free_memory()

    def wake_up(self) -> None:
        """Undo sleep(): the weights back (loaded again after level 2, adapters reloading on
        their next request), a fresh KV cache of the same size, decode graphs captured anew."""
        model = wake_weights(self.model, self.config.model, self.device)
        if model is not self.model and self.config.lora:  # loaded again: adapters too
            self.lora = LoRAManager(model, self.config.model, self.config.lora)
        self.model = model
        self.kv_caches = allocate_kv_caches(
            self.config.model, self._kv_shape, self.block_size, self._kv_dtype, self.device
        )
        self._bind_kv_caches()
        if self.draft is not None:
            self.draft.wake_up()
        self.graphs = _decode_graphs(self.config, self.model, self.backend, self.device)
        if self.graphs is not None:
            self.graphs.capture()

    @property
    def kv_window(self) -> int | None:
        """How far back any query sees when every layer attends over a sliding window (the KV
        of older positions is never read again); None when some layer sees all keys."""
        windows = [
            getattr(layer, "sliding_window", None) for layer in self.model.attention_layers()
        ]
        return None if not windows or None in windows else max(windows)

    def check_invariants(self) -> None:
        """Only requests the runner holds hold images; the draft's KV covers no more than the
        tokens each request has."""
        if self.images is not None:
            self.images.check_invariants(set(self.batch.row_of))
        if self.draft is not None:
            rows = self.batch.rows_of(list(self.batch.row_of))
            assert (self.draft.num_valid[rows] <= self.batch.num_tokens[rows]).all()

    def batch_state(self) -> dict[str, tuple[int, int]]:
        """Each request's (tokens, computed tokens): what every tensor-parallel rank agrees on."""
        batch = self.batch
        return {
            req_id: (int(batch.num_tokens[row]), int(batch.num_computed_tokens[row]))
            for req_id, row in batch.row_of.items()
        }

    def check_health(self) -> None:
        """Nothing to check: the model runs in this process (TensorParallelRunner's has ranks)."""

    def shutdown(self) -> None:
        """Nothing to stop: no process runs beside this one (TensorParallelRunner's has)."""

    def _bind_kv_caches(self) -> None:
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches, strict=True):
            layer.kv_cache = cache

    # ---- one step: execute, then sample --------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> None:
        """Run the model over the step's tokens. The sampling rows' logits wait for `sample()`,
        so the step's grammar masks can be filled while a GPU still runs the forward."""
        self._update_states(so)
        self._executed = None
        if so.is_empty:
            return
        inputs = self._prepare_inputs(so)
        if self._to_encode:
            self._encode()
        hidden = self._forward(inputs)  # [num_tokens, hidden]
        sample_idx = np.flatnonzero(inputs.sample_mask)
        num_rows = inputs.num_drafts[sample_idx] + 1
        logits = None
        if len(sample_idx):
            ends = inputs.common.query_start_loc[1:][sample_idx]
            token_idx = np.repeat(ends, num_rows) - ranks_from_end(num_rows) - 1
            logits = self.model.compute_logits(hidden[to_device(token_idx, self.device)])
            if self._num_encoder_tokens and logits is not None:  # Whisper's suppress/timestamps
                rows = inputs.rows[sample_idx].tolist()
                self.model.process_logits(
                    logits,
                    [self.batch.prompt_token_ids(r) for r in rows],
                    [self.batch.output_token_ids(r) for r in rows],
                )
        no_speech = self._no_speech(inputs, hidden) if self._sot else {}
        self._executed = _ExecutedStep(inputs, hidden, sample_idx, num_rows, logits, no_speech)

    @torch.inference_mode()
    def sample(self, grammar: GrammarBitmask | None = None) -> dict[str, SampledTokens]:
        """Sample the executed step's sampling rows (masked by `grammar`) and gather any prompt
        logprobs its chunks asked for."""
        step, self._executed = self._executed, None
        results: dict[str, SampledTokens] = {}
        if step is None:
            return results
        inputs, sample_idx, num_rows = step.inputs, step.sample_idx, step.num_rows
        if step.logits is not None:
            first_row = np.cumsum(num_rows) - num_rows
            if grammar is not None:  # (a constrained request has no guesses: one row)
                position = {
                    inputs.req_ids[i]: int(r) for i, r in zip(sample_idx, first_row, strict=True)
                }
                self._apply_grammar(grammar, position, step.logits)
            rows = np.repeat(inputs.rows[sample_idx], num_rows)
            if len(rows) == len(sample_idx):
                md = build_sampling_metadata(self.batch, rows, self.vocab_size, self.device)
                out = self.sampler(step.logits, md)
            else:
                offsets = ranks(num_rows)
                md = build_sampling_metadata(
                    self.batch, rows, self.vocab_size, self.device, offsets
                )
                out = self.sampler(step.logits, md, self._drafts(rows, offsets, num_rows))
            self._collect_samples(inputs, sample_idx, num_rows, out, results)
        self._collect_prompt_logprobs(inputs, step.hidden, results)
        for req_id, prob in step.no_speech.items():
            prev = results.get(req_id, SampledTokens([]))
            results[req_id] = dataclasses.replace(prev, no_speech_prob=prob)
        if self.draft is not None:
            self._guess(inputs, results)
        return results

    def extend_tokens(self, tokens: dict[str, list[int]]) -> None:
        """Append tokens another rank sampled (a tensor-parallel rank other than 0, whose
        logits went to rank 0) to the requests' rows, as that rank's sample() did to its own."""
        for req_id, token_ids in tokens.items():
            row = self.batch.row_of.get(req_id)
            if row is not None:
                self.batch.extend_tokens(row, token_ids)

    def _guess(self, inputs: StepInputs, results: dict[str, SampledTokens]) -> None:
        """The draft model's guesses for each sampling request's next step, beside its sampled
        tokens (none for those whose sampling depends on each position's history)."""
        assert self.draft is not None
        states = [self.batch.state(r).params for r in inputs.rows.tolist()]
        wants = np.fromiter(
            (p.structured_outputs is None and not p.has_penalties for p in states),
            bool,
            len(states),
        )
        guesses = self.draft.propose(self.batch, inputs.rows, inputs.sample_mask, wants)
        for req_id, row in zip(inputs.req_ids, inputs.rows.tolist(), strict=True):
            if row in guesses and req_id in results:
                results[req_id] = dataclasses.replace(results[req_id], draft_token_ids=guesses[row])

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        common = inputs.common
        num_rows = len(inputs.req_ids)
        mapping = self._lora_mapping(inputs)
        decode_only = int(common.query_start_loc[-1]) == num_rows  # one token per request
        # graphs hold the base model only: a step with adapters (or embeddings) runs eagerly
        if (
            self.graphs is not None
            and decode_only
            and mapping is None
            and inputs.prompt_embeds is None
            and inputs.rope_positions is None
            and self.graphs.padded_size(num_rows)
        ):
            return self.graphs.run(
                inputs.input_ids,
                inputs.positions,
                common.slot_mapping,
                common.seq_lens,
                common.block_table,
            )
        with set_forward_context(self.backend.build_metadata(common), mapping):
            if self._num_encoder_tokens:
                return self.model(inputs.input_ids, inputs.positions, self._cross_layout(inputs))
            positions = inputs.positions if inputs.rope_positions is None else inputs.rope_positions
            if inputs.prompt_embeds is not None:
                return self.model(inputs.input_ids, positions, inputs.prompt_embeds)
            return self.model(inputs.input_ids, positions)

    def _encode(self) -> None:
        """The encoder over the windows of the requests this step starts, their cross K/V into
        their blocks: once per request (again only after a preemption freed the blocks)."""
        windows, self._to_encode = self._to_encode, []
        features = torch.stack([w for w, _ in windows])
        self.model.encode(features, [blocks for _, blocks in windows])

    def _no_speech(self, inputs: StepInputs, hidden: torch.Tensor) -> dict[str, float]:
        """Whisper's no-speech probability of each request whose start-of-transcript position
        is among this step's tokens."""
        common = inputs.common
        starts = common.seq_lens - common.query_lens
        found = {}
        for i, req_id in enumerate(inputs.req_ids):
            sot = self._sot.get(req_id)
            if sot is not None and starts[i] <= sot < common.seq_lens[i]:
                found[req_id] = int(common.query_start_loc[i] + sot - starts[i])
        if not found:
            return {}
        rows = to_device(np.fromiter(found.values(), np.int64, len(found)), self.device)
        probs = to_host(self.model.no_speech_probs(hidden[rows]))[0].tolist()
        return dict(zip(found, probs, strict=True))

    def _cross_layout(self, inputs: StepInputs) -> CrossLayout:
        qsl = inputs.common.query_start_loc.tolist()
        return CrossLayout(
            [(qsl[i], qsl[i + 1], self._cross[req_id]) for i, req_id in enumerate(inputs.req_ids)]
        )

    def _lora_mapping(self, inputs: StepInputs) -> LoRAMapping | None:
        """Slots for the step's adapters (loading any that is new) and each one's token rows."""
        if self.lora is None:
            return None
        ids = self.batch.lora_id[inputs.rows]
        if not ids.any():
            return None
        held = self.batch.lora_id[list(self.batch.row_of.values())]
        in_use = set(held[held > 0].tolist())
        token_ids = np.repeat(ids, inputs.common.query_lens)
        groups = []
        for lora_id in np.unique(ids[ids > 0]).tolist():
            request = self.batch.state(int(inputs.rows[np.argmax(ids == lora_id)])).lora_request
            assert request is not None
            try:
                slot = self.lora.activate(request, in_use)
            except Exception as exc:  # its files changed since it was checked: its requests fail
                users = [
                    r for r, i in zip(inputs.req_ids, ids.tolist(), strict=True) if i == lora_id
                ]
                raise RequestFailed(
                    users, f"LoRA adapter {request.lora_name!r} could not be loaded: {exc}"
                ) from exc
            if (ids == lora_id).all():
                groups.append((slot, None))
            else:
                rows = np.flatnonzero(token_ids == lora_id)
                groups.append((slot, to_device(rows, self.device)))
        return LoRAMapping(tuple(groups))

    def _drafts(self, rows: np.ndarray, offsets: np.ndarray, num_rows: np.ndarray) -> torch.Tensor:
        """Each logits row's guessed token (stored after its request's tokens), -1 on the
        last row of each request: the position past its guesses, which only samples."""
        drafts = self.batch.token_ids[rows, self.batch.num_tokens[rows] + offsets]
        drafts[np.cumsum(num_rows) - 1] = -1
        return to_device(drafts, self.device)

    def _apply_grammar(
        self, grammar: GrammarBitmask, position: dict[str, int], logits: torch.Tensor
    ) -> None:
        """`position`: the logits row of each sampling request."""
        rows = np.fromiter((position[r] for r in grammar.req_ids), np.int64, len(grammar.req_ids))
        apply_grammar_bitmask(logits, grammar.bitmask, to_device(rows, logits.device))

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.batch
        for req_id in so.finished_req_ids:
            batch.remove(req_id)
            self._prompt_embeds.pop(req_id, None)
            self._cross.pop(req_id, None)
            self._sot.pop(req_id, None)
            if self.images is not None:
                self.images.remove(req_id)
        for new in so.new_reqs:
            batch.add(new)
            if self.draft is not None:
                self.draft.add(batch.row_of[new.req_id], new.num_computed_tokens)
            if new.images:
                assert self.images is not None  # the input processor checked the model
                self.images.add(new)
            if new.prompt_embeds is not None:
                self._prompt_embeds[new.req_id] = self._embeds_tensor(new.prompt_embeds)
            if new.encoder_features is not None:
                blocks = CrossBlocks.of(new.cross_block_ids, self._num_encoder_tokens, self.device)
                self._cross[new.req_id] = blocks
                start = self.config.model.hf_config.get("decoder_start_token_id")
                if start in new.token_ids[: new.num_prompt_tokens]:
                    self._sot[new.req_id] = new.token_ids.index(start)
                window = float32_tensor(
                    new.encoder_features.data, tuple(new.encoder_features.shape)
                )
                self._to_encode.append((window.to(self.device, self._kv_dtype), blocks))
        for cached in so.cached_reqs:
            row = batch.row_of[cached.req_id]
            batch.append_blocks(row, cached.new_block_ids)
            batch.num_computed_tokens[row] = cached.num_computed_tokens

    def _embeds_tensor(self, embeds: PromptEmbeds) -> torch.Tensor:
        rows = float32_tensor(embeds.data, (embeds.num_tokens, embeds.hidden_size))
        return rows.to(device=self.device, dtype=torch_dtype(self.config.model.dtype))

    def _embeds_override(
        self, req_ids: list[str], query_start_loc: np.ndarray, positions: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's tokens that are prompt positions of a prompt given as embeddings, and
        those embeddings (a resumed request recomputes them from the same rows)."""
        indices, values = [], []
        for i, req_id in enumerate(req_ids):
            embeds = self._prompt_embeds.get(req_id)
            if embeds is None:
                continue
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            step_positions = positions[start:end]
            inside = step_positions < embeds.shape[0]
            if inside.any():
                indices.append(np.arange(start, end)[inside])
                values.append(embeds[torch.from_numpy(step_positions[inside])])
        if not indices:
            return None
        return to_device(np.concatenate(indices), self.device), torch.cat(values)

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        batch = self.batch
        req_ids = list(so.num_scheduled_tokens)
        sampling = set(so.sampling_req_ids)
        rows = batch.rows_of(req_ids)
        num_drafts = np.zeros(len(req_ids), dtype=np.int64)
        if so.spec_token_ids:
            for i, req_id in enumerate(req_ids):
                drafts = so.spec_token_ids.get(req_id)
                if drafts:  # the guesses go where the tokens they guess would be
                    row, end = rows[i], batch.num_tokens[rows[i]]
                    batch.token_ids[row, end : end + len(drafts)] = drafts
                    num_drafts[i] = len(drafts)
        num_scheduled = np.fromiter(so.num_scheduled_tokens.values(), np.int64, len(req_ids))
        query_start_loc = np.zeros(len(req_ids) + 1, dtype=np.int64)
        np.cumsum(num_scheduled, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        token_req = np.repeat(np.arange(len(req_ids)), num_scheduled)  # [num_tokens]
        token_rows = rows[token_req]
        start = batch.num_computed_tokens[rows]
        positions = start[token_req] + np.arange(num_tokens) - query_start_loc[:-1][token_req]
        input_ids = batch.token_ids[token_rows, positions]
        block_ids = batch.block_table[token_rows, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        seq_lens = start + num_scheduled
        batch.num_computed_tokens[rows] = seq_lens
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=batch.block_table[rows],
            slot_mapping=to_device(slot_mapping, self.device),
            block_size=self.block_size,
        )
        return StepInputs(
            req_ids=req_ids,
            rows=rows,
            input_ids=to_device(input_ids, self.device),
            positions=to_device(positions, self.device),
            common=common,
            sample_mask=np.fromiter((r in sampling for r in req_ids), bool, len(req_ids)),
            num_drafts=num_drafts,
            prompt_embeds=self._override(req_ids, query_start_loc, positions, seq_lens),
            rope_positions=self.images.rope_positions(req_ids, query_start_loc, positions)
            if self.images is not None and self.images.mrope
            else None,
        )

    def _override(
        self,
        req_ids: list[str],
        query_start_loc: np.ndarray,
        positions: np.ndarray,
        seq_lens: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows that replace token embeddings this step: prompts given as embeddings, and
        images (whose requests then let go of the images they have run past)."""
        parts = []
        if self._prompt_embeds:
            parts.append(self._embeds_override(req_ids, query_start_loc, positions))
        if self.images is not None:
            parts.append(self.images.override(req_ids, query_start_loc, positions, seq_lens))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _collect_samples(
        self,
        inputs: StepInputs,
        sample_idx: np.ndarray,
        num_rows: np.ndarray,
        out: SamplerOutput,
        results: dict[str, SampledTokens],
    ) -> None:
        out = _on_host(out)  # the step's one wait for the device
        rows = inputs.rows[sample_idx]
        sampled = out.sampled_token_ids.tolist()
        req_ids = [inputs.req_ids[idx] for idx in sample_idx.tolist()]
        if out.accepted is None:  # one token each
            self.batch.append_tokens(rows, out.sampled_token_ids.numpy())
            spans = [(i, i + 1) for i in range(len(rows))]
        else:
            spans = _accepted_spans(num_rows, out.accepted.tolist())
            for row, (start, end) in zip(rows.tolist(), spans, strict=True):
                self.batch.extend_tokens(row, sampled[start:end])
        if out.logprobs is None:
            for req_id, (start, end) in zip(req_ids, spans, strict=True):
                results[req_id] = SampledTokens(sampled[start:end])
            return
        logprobs = _to_token_logprobs(out)
        for i, row in enumerate(rows.tolist()):
            start, end = spans[i]
            params = self.batch.state(row).params
            wanted = len(params.logprob_token_ids) if params.logprob_token_ids else params.logprobs
            entries = None
            if wanted is not None:
                entries = [
                    TokenLogprobs(lp.token_ids[: 1 + wanted], lp.logprobs[: 1 + wanted], lp.rank)
                    for lp in logprobs[start:end]
                ]
            results[req_ids[i]] = SampledTokens(sampled[start:end], logprobs=entries)

    def _collect_prompt_logprobs(
        self, inputs: StepInputs, hidden: torch.Tensor, results: dict[str, SampledTokens]
    ) -> None:
        """For requests asking for prompt logprobs: each prompt position in this chunk scores the
        prompt token that follows it (the last prompt position predicts the first output)."""
        qsl = inputs.common.query_start_loc
        for i, row in enumerate(inputs.rows.tolist()):
            state = self.batch.state(row)
            k = state.params.prompt_logprobs
            if k is None:
                continue
            first_pos = int(inputs.common.seq_lens[i] - (qsl[i + 1] - qsl[i]))
            last_pos = min(int(inputs.common.seq_lens[i]), state.num_prompt_tokens - 1)
            if last_pos <= first_pos:
                continue
            token_slice = slice(int(qsl[i]), int(qsl[i]) + last_pos - first_pos)
            logits = self.model.compute_logits(hidden[token_slice])
            if logits is None:  # a tensor-parallel rank other than 0: it helped gather them
                continue
            logprobs = torch.log_softmax(logits.float(), -1)
            targets = to_device(
                self.batch.token_ids[row, first_pos + 1 : last_pos + 1], self.device
            )
            entries = _to_token_logprobs(_on_host(gather_logprobs(logprobs, targets, k)))
            prev = results.get(inputs.req_ids[i])
            results[inputs.req_ids[i]] = SampledTokens(
                prev.token_ids if prev else [],
                logprobs=prev.logprobs if prev else None,
                prompt_logprobs=entries,
            )


def _decode_graphs(
    config: EngineConfig, model: nn.Module, backend: AttentionBackend, device: torch.device
) -> DecodeGraphs | None:
    """Decode graphs where they can run (CUDA, a backend that supports them), unless eager."""
    if device.type != "cuda" or not backend.supports_cuda_graphs or config.enforce_eager:
        return None
    return DecodeGraphs(
        model, backend, config.scheduler.max_num_seqs, _max_blocks_per_seq(config), device
    )


def _max_blocks_per_seq(config: EngineConfig) -> int:
    """Block-table width: every block a max_model_len sequence (plus its next token) can need."""
    return -(-(config.scheduler.max_model_len + 1) // config.cache.block_size)


@torch.inference_mode()
def profile_forward(
    model: nn.Module, backend: AttentionBackend, config: EngineConfig, device: torch.device
) -> None:
    """Run the largest step the scheduler can form (max_num_batched_tokens tokens, then logits
    for max_num_seqs rows) on a scratch KV cache, so that the peak memory it leaves behind sizes
    the real cache with room for activations. The scratch cache is unbound and freed after."""
    sched, block_size = config.scheduler, config.cache.block_size
    num_tokens = sched.max_num_batched_tokens
    row_len = min(num_tokens, sched.max_model_len)
    lens = np.full(num_tokens // row_len, row_len, dtype=np.int64)
    if num_tokens % row_len:
        lens = np.append(lens, num_tokens % row_len)
    blocks_per_row = -(-row_len // block_size)
    # block 0 is the null block; row i owns blocks 1 + i * blocks_per_row ...
    block_table = 1 + np.arange(len(lens) * blocks_per_row, dtype=np.int32).reshape(len(lens), -1)
    positions = np.concatenate([np.arange(n) for n in lens])
    rows = np.repeat(np.arange(len(lens)), lens)
    slots = block_table[rows, positions // block_size].astype(np.int64) * block_size
    query_start_loc = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start_loc[1:])
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        seq_lens=lens,
        block_table=block_table,
        slot_mapping=torch.from_numpy(slots + positions % block_size).to(device),
        block_size=block_size,
    )
    dtype = torch_dtype(config.model.dtype)
    layers = model.attention_layers()
    model_config = config.model
    shape = backend.kv_cache_shape(
        1 + block_table.size, block_size, model_config.num_kv_heads, model_config.head_dim
    )
    for layer in layers:
        layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    try:
        with set_forward_context(backend.build_metadata(common)):
            hidden = model(
                torch.zeros(num_tokens, dtype=torch.long, device=device),
                torch.from_numpy(positions).to(device),
            )
        rows_to_sample = min(sched.max_num_seqs, num_tokens)
        model.compute_logits(hidden[:rows_to_sample]).float()
    finally:
        for layer in layers:
            layer.kv_cache = None


def _accepted_spans(num_rows: np.ndarray, accepted: list[bool]) -> list[tuple[int, int]]:
    """Each request's rows whose tokens it keeps: its accepted guesses, then the first row
    whose guess was rejected (holding the token that replaced it) or the row past them all."""
    spans, start = [], 0
    for n in num_rows.tolist():
        end = start + 1
        while end < start + n and accepted[end - 1]:
            end += 1
        spans.append((start, end))
        start += n
    return spans


def _on_host(out: SamplerOutput) -> SamplerOutput:
    """`out`'s tensors on the CPU, after one wait for the device."""
    names = ("sampled_token_ids", "logprob_token_ids", "logprobs", "sampled_ranks", "accepted")
    present = [name for name in names if getattr(out, name) is not None]
    on_host = to_host(*(getattr(out, name) for name in present))
    return SamplerOutput(**dict(zip(present, on_host, strict=True)))


def _to_token_logprobs(out: SamplerOutput) -> list[TokenLogprobs]:
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert out.sampled_ranks is not None
    return [
        TokenLogprobs(ids, lps, rank)
        for ids, lps, rank in zip(
            out.logprob_token_ids.tolist(),
            out.logprobs.tolist(),
            out.sampled_ranks.tolist(),
            strict=True,
        )
    ]
