"""The results database's counts as Prometheus metrics, read at each collection: served by
the web app at /metrics, and written by `cxrbatch watch` to a node_exporter textfile
(`metrics.textfile`), so that a site's Prometheus sees a running daemon without the app.

    cxrbatch_outcomes{status}           current outcomes by status
    cxrbatch_triage{triage}             current outcomes by triage (none: not screened)
    cxrbatch_jobs{status}               the daemon's queue by job status
    cxrbatch_deliveries{status}         deliveries by status (pending, dead, ...)
    cxrbatch_rejected_files             files rejected or quarantined
    cxrbatch_stage_seconds{stage}       per-stage seconds of the most recent outcomes
    cxrbatch_daemon_workers             worker processes alive (textfile of `watch` only)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cxrbatch.db import Sessions
from cxrbatch.db import reads as rows

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ResultsCollector(Collector):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            counts = rows.metric_counts(session)
            timings = rows.stage_timings(session)
        for name, label, help_text in (
            ("outcomes", "status", "Current study outcomes by status."),
            ("triage", "triage", "Current study outcomes by triage category."),
            ("jobs", "status", "Jobs of the daemon's queue by status."),
            ("deliveries", "status", "Deliveries to PACS destinations by status."),
        ):
            family = GaugeMetricFamily(f"cxrbatch_{name}", help_text, labels=[label])
            for key, value in sorted(counts[name].items()):
                family.add_metric([key], value)
            yield family
        yield GaugeMetricFamily(
            "cxrbatch_rejected_files",
            "Input files rejected (quarantined or skipped), with their reasons in the database.",
            value=counts["rejected_files"]["all"],
        )
        histogram = HistogramMetricFamily(
            "cxrbatch_stage_seconds",
            "Seconds per pipeline stage over the most recent outcomes.",
            labels=["stage"],
        )
        stages = sorted({stage for timing in timings for stage in timing})
        for stage in stages:
            values = [t[stage] for t in timings if stage in t]
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            histogram.add_metric([stage], buckets, sum_value=sum(values))
        yield histogram


def write_textfile(sessions: Sessions, path: Path, workers_alive: int) -> None:
    """The metrics, and the daemon's worker count, in the node_exporter textfile format
    (written to a temporary file and renamed, as the textfile collector expects)."""
    registry = CollectorRegistry()
    registry.register(ResultsCollector(sessions))
    Gauge(
        "cxrbatch_daemon_workers", "Worker processes of cxrbatch watch alive.", registry=registry
    ).set(workers_alive)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
