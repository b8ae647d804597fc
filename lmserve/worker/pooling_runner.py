"""The pooling runner's worker: one packed forward pass over a step's prompts, pooled.

No KV cache: each prompt is seen whole in one pass (bidirectionally by an encoder, causally by
a decoder). An embedder's output is the pooled hidden state; a classifier's is its head's
logits, as probabilities unless asked not to. Outputs leave as float32 bytes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lmserve.config import EngineConfig
from lmserve.core.pooling_scheduler import PoolingBatch
from lmserve.core.request import Request
from lmserve.engine.messages import PooledData
from lmserve.models.loader import load_model
from lmserve.pooling.config import PoolerConfig
from lmserve.pooling.pooler import pool
from lmserve.transfer import float32_bytes, to_device

logger = logging.getLogger(__name__)


class PoolingRunner:
    def __init__(self, model: torch.nn.Module, pooler: PoolerConfig, device: torch.device) -> None:
        self.model = model
        self.pooler = pooler
        self.device = device

    @classmethod
    def load(cls, config: EngineConfig) -> PoolingRunner:
        device = torch.device(config.device)
        torch.manual_seed(config.model.seed)
        assert config.pooler is not None
        return cls(load_model(config.model, device, pooling=True), config.pooler, device)

    @torch.inference_mode()
    def run(self, batch: PoolingBatch) -> list[PooledData]:
        # longest first: attention groups prompts of similar length (packed_attention.py)
        requests = sorted(batch.requests, key=lambda r: -r.num_prompt_tokens)
        lens = [r.num_prompt_tokens for r in requests]
        flat = [t for r in requests for t in r.prompt_token_ids]
        positions = [p for n in lens for p in range(n)]
        extra = {}
        if any(r.token_type_ids is not None for r in requests):
            types = [t for r in requests for t in (r.token_type_ids or [0] * r.num_prompt_tokens)]
            extra["token_type_ids"] = to_device(torch.tensor(types), self.device)
        hidden = self.model(
            to_device(torch.tensor(flat), self.device),
            to_device(torch.tensor(positions), self.device),
            lens,
            **extra,
        )
        raw = pool(hidden, lens, PoolerConfig(self.pooler.pooling_type, normalize=False))
        if self.pooler.task == "classify":
            logits = self.model.classify(torch.stack(raw)).float()
            vectors = [self._activate(r, row) for r, row in zip(requests, logits, strict=True)]
        else:
            vectors = [self._embedding(r, x.float()) for r, x in zip(requests, raw, strict=True)]
        out = {
            r.req_id: PooledData(float32_bytes(v), list(v.shape))
            for r, v in zip(requests, vectors, strict=True)
        }
        return [out[r.req_id] for r in batch.requests]

    def _embedding(self, request: Request, vector: torch.Tensor) -> torch.Tensor:
        params = request.pooling_params
        dims = params.dimensions if params is not None else None
        dims = dims or self.pooler.dimensions
        normalize = self.pooler.normalize
        if params is not None and params.normalize is not None:
            normalize = params.normalize
        if dims is not None:
            vector = vector[..., :dims]
        return F.normalize(vector, p=2, dim=-1) if normalize else vector

    def _activate(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities as HF's pipelines and sentence-transformers' CrossEncoder give them:
        softmax over the labels, sigmoid for a single-label (score) head."""
        params = request.pooling_params
        activation = self.pooler.activation
        if params is not None and params.activation is not None:
            activation = params.activation
        if not activation:
            return logits
        return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(dim=-1)
