"""vLLM's /score and /rerank on a pooling model: a cross-encoder reads each pair together
(the probability of its one label), an embedding model scores the cosine of the two texts'
embeddings, each distinct text embedded once."""

from __future__ import annotations

from lmserve.api.errors import APIError
from lmserve.api.pooling_protocol import RerankRequest, ScoreRequest
from lmserve.api.replies import Reply, Whole
from lmserve.api.schemas.scores import (
    RerankedDocument,
    RerankList,
    RerankResult,
    ScoreData,
    ScoreList,
)
from lmserve.api.serving import common
from lmserve.api.serving.pooling import PoolingServing, usage
from lmserve.outputs import PoolingRequestOutput
from lmserve.pooling.score import check_scorable, cosine, pair_up
from lmserve.pooling_params import PoolingParams


class ScoreServing:
    def __init__(self, pooling: PoolingServing) -> None:
        self.pooling = pooling

    async def score(self, request: ScoreRequest) -> Reply:
        model = self.pooling.check(request.model, None, "/score")
        try:
            pairs = pair_up(request.text_1, request.text_2)
        except ValueError as exc:
            raise APIError(str(exc), param="text_1") from None
        base_id = common.new_id("score", request.request_id)
        scores, outputs = await self._scores(pairs, request, base_id, "text_2")
        data = [ScoreData(index=i, score=s) for i, s in enumerate(scores)]
        return Whole(
            ScoreList(
                id=base_id, created=common.now(), model=model, data=data, usage=usage(outputs)
            )
        )

    async def rerank(self, request: RerankRequest) -> Reply:
        model = self.pooling.check(request.model, None, "/rerank")
        texts = request.texts()
        if not texts:
            raise APIError("documents must not be empty", param="documents")
        base_id = common.new_id("rerank", request.request_id)
        scores, outputs = await self._scores(
            [(request.query, t) for t in texts], request, base_id, "documents"
        )
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        top = order[: request.top_n or len(order)]
        results = [
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=RerankedDocument(text=texts[i]) if request.return_documents else None,
            )
            for i in top
        ]
        return Whole(RerankList(id=base_id, model=model, usage=usage(outputs), results=results))

    async def _scores(
        self,
        pairs: list[tuple[str, str]],
        request: ScoreRequest | RerankRequest,
        base_id: str,
        param: str,
    ) -> tuple[list[float], list[PoolingRequestOutput]]:
        config = self.pooling.engine.config
        assert config.pooler is not None  # checked: a pooling model
        try:
            check_scorable(config.pooler.task, config.model.hf_config)
        except ValueError as exc:
            raise APIError(str(exc), param="model") from None
        truncate = request.truncate_prompt_tokens
        if config.pooler.task == "classify":
            outputs = await self.pooling.encode_all(
                [{"text": a, "text_pair": b} for a, b in pairs],
                request.pooling_params(),
                base_id,
                truncate,
            )
            return [float(o.outputs.data[0]) for o in outputs], outputs
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        if any(not t for t in texts):
            raise APIError("texts to score must not be empty", param=param)
        outputs = await self.pooling.encode_all(texts, PoolingParams(), base_id, truncate)
        vectors = {t: o.outputs.data.tolist() for t, o in zip(texts, outputs, strict=True)}
        return [cosine(vectors[a], vectors[b]) for a, b in pairs], outputs
