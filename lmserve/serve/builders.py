"""Serve applications from LLMConfigs: `build_llm_deployment` (one model, no router) and
`build_openai_app` (a router in front of one deployment per model). Both work as YAML
`import_path`s (`lmserve.serve:build_openai_app`)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from lmserve.serve.config import LLMConfig, LLMServingArgs
from lmserve.serve.router import LLMRouter
from lmserve.serve.server import LLMServer

_DEFAULT_DEPLOYMENT = {"max_ongoing_requests": 64, "health_check_period_s": 10}
_ROUTER_MAX_ONGOING = 1024


def build_llm_deployment(llm_config: LLMConfig | dict[str, Any]) -> Application:
    config = LLMConfig.model_validate(llm_config)
    options = {**_DEFAULT_DEPLOYMENT, **config.deployment_config}
    if config.runtime_env is not None:
        actor_options = dict(options.get("ray_actor_options") or {})
        actor_options.setdefault("runtime_env", config.runtime_env)
        options["ray_actor_options"] = actor_options
    if config.accelerator_type is not None:
        actor_options = dict(options.get("ray_actor_options") or {})
        resources = dict(actor_options.get("resources") or {})
        resources.setdefault(f"accelerator_type:{config.accelerator_type}", 0.001)
        actor_options["resources"] = resources
        actor_options.setdefault("num_gpus", 1)
        options["ray_actor_options"] = actor_options
    if config.placement_group_config is not None:
        options["placement_group_bundles"] = config.placement_group_config.bundles
        options["placement_group_strategy"] = config.placement_group_config.strategy
    name = "LLMServer:" + config.model_id.replace("/", "--")
    return serve.deployment(LLMServer, name=name).options(**options).bind(config)


def build_openai_app(args: LLMServingArgs | dict[str, Any]) -> Application:
    serving_args = LLMServingArgs.model_validate(args)
    servers = {c.model_id: build_llm_deployment(c) for c in serving_args.llm_configs}
    # Serve's default of 5 requests in flight per replica would throttle every model behind it
    router = serve.deployment(LLMRouter, name="LLMRouter", max_ongoing_requests=_ROUTER_MAX_ONGOING)
    lora_paths = {
        c.model_id: c.lora_config.dynamic_lora_loading_path
        for c in serving_args.llm_configs
        if c.lora_config is not None and c.lora_config.dynamic_lora_loading_path
    }
    return router.bind(servers, lora_paths)
