"""Serve applications from LLMConfigs: `build_llm_deployment` (one model, no router) and
`build_openai_app` (a router in front of one deployment per model). Both work as YAML
`import_path`s (`lmserve.serve:build_openai_app`)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from lmserve.serve.config import LLMConfig, LLMServingArgs
from lmserve.serve.router import LLMRouter
from lmserve.serve.server import LLMServer


def build_llm_deployment(llm_config: LLMConfig | dict[str, Any]) -> Application:
    return LLMServer.as_deployment().bind(llm_config)


def build_openai_app(args: LLMServingArgs | dict[str, Any]) -> Application:
    serving_args = LLMServingArgs.model_validate(args)
    servers = [build_llm_deployment(config) for config in serving_args.llm_configs]
    return LLMRouter.as_deployment().bind(servers)
