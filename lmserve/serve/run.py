"""`lmserve run config.yaml`: deploy a Serve config file (Ray's `serve run` format) without the
user learning Ray's CLI, on the running Ray cluster or a local one started for it."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

logger = logging.getLogger(__name__)


def deploy(config_path: Path) -> list[str]:
    """Start (or join) Ray and Serve, deploy every application of the file; their names.

    Relative paths in `args` (per-model YAML files) are read from the config file's directory.
    """
    config = yaml.safe_load(config_path.read_text()) or {}
    applications = config.get("applications") or []
    if not applications:
        raise ValueError(f"{config_path} has no `applications`: nothing to deploy")
    if not ray.is_initialized():
        try:
            ray.init(address="auto")
        except ConnectionError:
            logger.info("no Ray cluster is running: starting a local one")
            ray.init()
    http = config.get("http_options") or {}
    serve.start(
        http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)}
    )
    names = []
    for spec in applications:
        app = _build(spec, config_path.parent)
        name = spec.get("name", "default")
        serve.run(app, name=name, route_prefix=spec.get("route_prefix", "/"))
        names.append(name)
    return names


def _build(spec: dict[str, Any], base_dir: Path) -> Any:
    """An application from `import_path` (`module:attribute`): a builder called with `args`, or
    an already-bound application."""
    module_name, _, attr = spec["import_path"].replace(":", ".").rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target) or isinstance(target, serve.Application):
        return target
    args = dict(spec.get("args") or {})
    if "llm_configs" in args:
        args["llm_configs"] = [
            str(base_dir / c) if isinstance(c, str) and not Path(c).is_absolute() else c
            for c in args["llm_configs"]
        ]
    return target(args)


def run(config_path: Path) -> int:
    """Deploy, then keep serving until interrupted."""
    names = deploy(config_path)
    logger.info("serving %s; Ctrl-C stops", ", ".join(names))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
