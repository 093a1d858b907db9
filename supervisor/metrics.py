"""The supervisor's Prometheus view: its own metrics, every live worker's, every process's.

Worker metrics arrive as snapshots fetched at scrape time (see ``ipferry.worker.metrics``); a dead
worker has no snapshot, so none of its series survive it. Process metrics come from ``/proc`` for
each role, since prometheus-client's process collector only sees its own process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessInfo:
    role: str
    worker: str  # "" for roles that are not workers
    pid: int


def read_proc(pid: int) -> dict[str, float] | None:
    """CPU seconds, RSS bytes, open fds and start time of ``pid`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration):
        return None
    # Fields after "(comm)": state is [0], utime [11], stime [12], starttime [19], rss [21].
    info = {
        "cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK,
        "rss": int(fields[21]) * PAGE_SIZE,
        "start": btime + int(fields[19]) / CLK_TCK,
    }
    try:
        info["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return info


class ProcessCollector(Collector):
    """``ipferry_process_*{role,worker}`` for the supervisor, nsd and each live worker."""

    def __init__(self, processes: Callable[[], Iterable[ProcessInfo]]) -> None:
        self.processes = processes

    def collect(self) -> Iterable[Metric]:
        families = {
            "cpu": Metric("ipferry_process_cpu_seconds", "CPU time (user+system) by process role.",
                          "counter"),
            "rss": Metric("ipferry_process_resident_memory_bytes", "Resident memory by process role.",
                          "gauge"),
            "fds": Metric("ipferry_process_open_fds", "Open file descriptors by process role.",
                          "gauge"),
            "start": Metric("ipferry_process_start_time_seconds",
                            "Start time since the epoch by process role.", "gauge"),
        }
        for p in self.processes():
            info = read_proc(p.pid)
            if info is None:
                continue
            labels = {"role": p.role, "worker": p.worker}
            for key, family in families.items():
                if key in info:
                    suffix = "_total" if family.type == "counter" else ""
                    family.add_sample(family.name + suffix, labels, info[key])
        yield from families.values()


class WorkerSnapshotCollector(Collector):
    """Replays the latest snapshot of each live worker with a ``worker`` label added."""

    def __init__(self) -> None:
        self.snapshots: dict[int, list[dict]] = {}

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for worker, families in sorted(self.snapshots.items()):
            for fam in families:
                metric = merged.get(fam["name"])
                if metric is None:
                    metric = merged[fam["name"]] = Metric(fam["name"], fam["help"], fam["type"])
                for name, labels, value in fam["samples"]:
                    metric.add_sample(name, {**labels, "worker": str(worker)}, value)
        yield from merged.values()


class NodeLabelled:
    """A registry's metrics with a ``node`` label on every sample: a fleet's nodes scraped into
    one Prometheus stay apart, whatever the scrape job's target labels say."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        self.node = node

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            metric.samples = [s._replace(labels={**s.labels, "node": self.node})
                              for s in metric.samples]
            yield metric


class SupervisorMetrics:
    def __init__(self, processes: Callable[[], Iterable[ProcessInfo]],
                 workers_ready: Callable[[], float], nsd_up: Callable[[], float], *,
                 node: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.exposed = NodeLabelled(self.registry, node) if node else self.registry
        self.worker_restarts = Counter(
            "ipferry_worker_restarts", "Times a worker was restarted, by worker index.",
            ["worker"], registry=self.registry)
        self.workers_ready = Gauge("ipferry_workers_ready", "Workers equipped and serving.",
                                   registry=self.registry)
        self.workers_ready.set_function(workers_ready)
        self.workers_configured = Gauge("ipferry_workers_configured", "Workers the config asks for.",
                                        registry=self.registry)
        self.nsd_restarts = Counter("ipferry_nsd_restarts", "Times nsd (the namespace) was rebuilt.",
                                    registry=self.registry)
        self.nsd_up = Gauge("ipferry_nsd_up", "1 while nsd serves its namespace.",
                            registry=self.registry)
        self.nsd_up.set_function(nsd_up)
        self.reloads = Counter("ipferry_config_reloads", "Config reloads, by result.", ["result"],
                               registry=self.registry)
        for result in ("applied", "refused"):
            self.reloads.labels(result)
        self.workers = WorkerSnapshotCollector()
        self.registry.register(self.workers)
        self.registry.register(ProcessCollector(processes))

    def render(self, snapshots: dict[int, list[dict]]) -> bytes:
        """The exposition with these worker snapshots (by index; fetched for this scrape)."""
        self.workers.snapshots = snapshots  # no await from here to the end: this scrape's own
        try:
            return generate_latest(self.exposed)
        finally:
            self.workers.snapshots = {}
