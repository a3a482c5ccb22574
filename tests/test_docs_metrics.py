"""Every metric the edge daemon and the cloud expose is documented, by its full name, in their
READMEs' metrics tables: a monitoring engineer writes rules from those, and a reviewer found
eight edge and five cloud series named nowhere. Real registries, scraped as Prometheus would.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitdet.cloud.metrics import ServerMetrics
from splitdet.edge.daemon_metrics import EdgeMetrics
from splitdet.edge.store import ResultStore
from splitdet.edge.watcher import HotFolder

ROOT = Path(__file__).resolve().parents[1]


def exposed(registry) -> set[str]:
    """The names a scrape of `registry` shows (a counter's with its _total)."""
    text = generate_latest(registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # (prometheus_client's own timestamps)
                names.add(sample.name)
    # a histogram's or summary's series are documented by the family's name
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def documented(readme: Path, prefix: str) -> set[str]:
    """The metric names `readme` spells out in backticks (`a`, `b` in one cell too)."""
    text = readme.read_text()
    return set(re.findall(rf"`({prefix}[a-z_]+)", text))


def test_every_edge_metric_is_in_the_edge_readme(tmp_path):
    (tmp_path / "hot").mkdir()
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        folder = HotFolder(tmp_path / "hot")
        model = {"fingerprint": "f", "threshold": "0.5", "calibrated_threshold": "0.5",
                 "codec": "int8"}  # fmt: skip
        metrics = EdgeMetrics(store, folder, model)
        names = exposed(metrics.registry)
    finally:
        store.close()
    assert len(names) > 12
    missing = names - documented(ROOT / "edge" / "README.md", "splitdet_edge_")
    assert not missing, f"edge/README.md names no {sorted(missing)}"


def test_every_cloud_metric_is_in_the_cloud_readme():
    names = exposed(ServerMetrics(["fp"]).registry)
    assert len(names) > 12
    missing = names - documented(ROOT / "cloud" / "README.md", "splitdet_cloud_")
    assert not missing, f"cloud/README.md names no {sorted(missing)}"
