"""Two Ray nodes on one machine (a head and a second node joined to it, as `ray start --address`
joins one): two replicas of one model land one per node, and the one router serves both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from lmserve.serve import build_openai_app
from tests.api.conftest import free_port


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head with one CPU and a second node with one CPU: a replica reserving one CPU fits
    on each node, and no node holds two."""
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def test_two_replicas_spread_over_two_nodes_behind_one_router(
    cluster: Cluster, tiny_chat_dir: Path
) -> None:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {"model_id": "tiny", "model_source": str(tiny_chat_dir)},
                    "engine_kwargs": {"max_model_len": 512, "kv_cache_memory_gb": 0.05},
                    "deployment_config": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
                }
            ]
        }
    )  # fmt: skip
    serve.run(app, name="spread", route_prefix="/")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    # each node's one CPU is held by a replica (the router and Serve's own actors hold none)
    per_node = ray._private.state.available_resources_per_node()
    assert [per_node[n["NodeID"]].get("CPU", 0.0) for n in nodes] == [0.0, 0.0]
    status = serve.status().applications["spread"].deployments
    replicas = {name: d.replica_states for name, d in status.items() if "LLMServer" in name}
    assert list(replicas.values()) == [{"RUNNING": 2}]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    answers = [
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4
        )
        for i in range(8)
    ]
    assert all(a.usage.completion_tokens == 4 for a in answers)
