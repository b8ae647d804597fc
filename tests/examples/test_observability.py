"""The Grafana dashboard in examples/observability charts only series a real server exports:
every metric its queries name, with every label they select on, is on /metrics after some
traffic (speculating, so the spec_decode series exist, and one bad request for the error
counter), and its model variable finds the served name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import start_server, stop_server

DASHBOARD = Path(__file__).parents[2] / "examples" / "observability" / "grafana-dashboard.json"
SELECTOR = re.compile(r"(lmserve:[a-z0-9_]+)(?:\{([^}]*)\})?")


@pytest.fixture(scope="module")
def exported(tiny_model_dirs) -> dict[str, set[str]]:
    """Each sample name on /metrics after some traffic, with the labels it carries."""
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}'
    server = start_server(str(tiny_model_dirs["llama"]), "--served-model-name", "tiny",
                          "--kv-cache-memory-gb", "0.02", "--speculative-config", spec)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        for _ in range(2):
            client.completions.create(model="tiny", prompt=[5, 6, 7] * 20, max_tokens=8)
        assert httpx.post(f"{server.url}/v1/completions", json={"model": "tiny"}).status_code == 400
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        stop_server(server)
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z0-9_:]+)(?:\{([^}]*)\})? ", line)
        if match:
            labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
            samples.setdefault(match.group(1), set()).update(labels)
    return samples


def test_every_query_names_exported_series_and_labels(exported) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 12
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = SELECTOR.findall(target["expr"])
            assert found, target["expr"]
            for name, selector in found:
                assert name in exported, f"{panel['title']}: {name} is not on /metrics"
                wanted = set(re.findall(r"(\w+)=", selector))
                assert wanted <= exported[name], (panel["title"], name, wanted)
            by = re.findall(r"by \(([\w, ]+)\)", target["expr"])
            for labels in by:
                for label in labels.split(","):
                    label = label.strip()
                    assert any(label in exported[n] or label == "le" for n, _ in found), (
                        panel["title"],
                        label,
                    )


def test_the_model_variable_lists_the_served_name(exported) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model_name")
    name, label = re.match(r"label_values\((lmserve:\w+), (\w+)\)", variable["definition"]).groups()
    assert label in exported[name]
