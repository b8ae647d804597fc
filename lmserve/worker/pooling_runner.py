"""The pooling runner's worker: one packed forward pass over a step's prompts, pooled.

No KV cache: an encoder sees each prompt whole in one pass. Outputs leave as float32 bytes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lmserve.config import EngineConfig
from lmserve.core.pooling_scheduler import PoolingBatch
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
        return cls(load_model(config.model, device), config.pooler, device)

    @torch.inference_mode()
    def run(self, batch: PoolingBatch) -> list[PooledData]:
        # longest first: attention groups prompts of similar length (packed_attention.py)
        requests = sorted(batch.requests, key=lambda r: -r.num_prompt_tokens)
        prompts = [r.prompt_token_ids for r in requests]
        lens = [len(ids) for ids in prompts]
        flat = [t for ids in prompts for t in ids]
        positions = [p for n in lens for p in range(n)]
        hidden = self.model(
            to_device(torch.tensor(flat), self.device),
            to_device(torch.tensor(positions), self.device),
            lens,
        )
        raw = pool(hidden.float(), lens, PoolerConfig(self.pooler.pooling_type, normalize=False))
        out = {}
        for request, vector in zip(requests, raw, strict=True):
            params = request.pooling_params
            dims = params.dimensions if params is not None else None
            normalize = self.pooler.normalize
            if params is not None and params.normalize is not None:
                normalize = params.normalize
            if dims is not None:
                vector = vector[..., :dims]
            if normalize:
                vector = F.normalize(vector, p=2, dim=-1)
            out[request.req_id] = PooledData(float32_bytes(vector), list(vector.shape))
        return [out[r.req_id] for r in batch.requests]
