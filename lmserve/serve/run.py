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
    local = False
    if not ray.is_initialized():
        try:
            ray.init(address="auto")
        except ConnectionError:
            logger.info("no Ray cluster is running: starting a local one")
            ray.init()
            local = True
    built = [
        (spec.get("name", "default"), _build(spec, config_path.parent), spec)
        for spec in applications
    ]
    shortfall = placement_shortfall([(name, app) for name, app, _ in built])
    if shortfall is not None:
        if local:  # nothing will join this cluster: Serve would wait for the resources forever
            raise ResourceError(shortfall)
        logger.warning("%s; waiting for the cluster to grow", shortfall)
    http = config.get("http_options") or {}
    serve.start(
        http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)}
    )
    for name, app, spec in built:
        serve.run(app, name=name, route_prefix=spec.get("route_prefix", "/"))
    return [name for name, _, _ in built]


class ResourceError(RuntimeError):
    """The applications cannot all be placed on this Ray cluster."""


def placement_shortfall(apps: list[tuple[str, Any]]) -> str | None:
    """What the applications' first replicas reserve, against what the cluster has in all; a
    message naming both when it does not fit, else None."""
    wanted: dict[str, float] = {}
    parts = []
    for app_name, app in apps:
        for name, replicas, per_replica in _reservations(app_name, app):
            for resource, amount in per_replica.items():
                wanted[resource] = wanted.get(resource, 0.0) + replicas * amount
            shown = {k: v for k, v in per_replica.items() if v}
            parts.append(f"{name}: {replicas} x {shown}")
    have = ray.cluster_resources()
    short = {k: v for k, v in wanted.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return None
    wanted_text = ", ".join(f"{k} {v:g}" for k, v in sorted(short.items()))
    have_text = ", ".join(f"{k} {have.get(k, 0.0):g}" for k in sorted(short))
    return (
        f"the applications need {wanted_text} to start ({'; '.join(parts)}), but this Ray "
        f"cluster has {have_text} in all. Reserve less per replica (deployment_config: "
        "ray_actor_options: num_cpus: 0.5, for example), start fewer replicas, or serve fewer "
        "models"
    )


def _reservations(app_name: str, app: Any) -> list[tuple[str, int, dict[str, float]]]:
    """(deployment, replicas, per replica) for each deployment of the application."""
    # NOTE: Serve's own builder and configs, which are not public API; where they change, no
    # check is made
    from ray.serve._private.build_app import build_app

    try:
        deployments = build_app(app, name=app_name).deployments
        return [(d.name, *_reservation(d)) for d in deployments]
    except Exception:  # noqa: BLE001 - a Serve version whose internals differ: skip the check
        logger.debug("could not inspect %s's deployments", app_name, exc_info=True)
        return []


def _reservation(deployment: Any) -> tuple[int, dict[str, float]]:
    """(replicas Serve starts first, what each reserves: its placement bundles, or else its
    actor's resources)."""
    config = deployment._deployment_config
    autoscaling = config.autoscaling_config
    if autoscaling is not None:
        replicas = autoscaling.initial_replicas
        replicas = autoscaling.min_replicas if replicas is None else replicas
    else:
        replicas = config.num_replicas
    bundles = deployment._replica_config.placement_group_bundles
    if not bundles:
        return replicas, dict(deployment._replica_config.resource_dict)
    total: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            total[resource] = total.get(resource, 0.0) + amount
    return replicas, total


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
    try:
        names = deploy(config_path)
    except ResourceError as exc:
        logger.error("cannot deploy %s: %s", config_path, exc)
        ray.shutdown()
        return 1
    logger.info("serving %s; Ctrl-C stops", ", ".join(names))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
