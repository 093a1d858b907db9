"""From per-run samples to the summary: medians with min and max, ratios, markdown, JSON, chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from workloads import METRIC, METRICS, Metric

LIMIT = "veth"
PEERS = ("pasta", "slirp4netns")
DEVICES_LIMIT = "devices-veth"  # device to device (bench/devices.py): its own table, its own limit
DEVICES_PEERS = ("devices-wireguard",)
COLORS = {"ipferry-w1": "#1f77b4", "ipferry-w2": "#17becf", "ipferry-gue": "#9467bd",
          "pasta": "#ff7f0e", "slirp4netns": "#d62728", "veth": "#2ca02c", "haproxy": "#bcbd22",
          "devices-ip-w1": "#1f77b4", "devices-ip-w2": "#17becf", "devices-stream-w1": "#8c564b",
          "devices-stream-w2": "#e377c2", "devices-veth": "#2ca02c",
          "devices-wireguard": "#7f7f7f"}  # the same every run


def summarize(samples: dict, errors: dict, transports: list[dict], mtus: list[int]) -> list[dict]:
    """One row per (metric, MTU): per transport median/min/max, ratio to veth and to every other
    transport measured in the same row."""
    rows = []
    for metric in METRICS:
        for mtu in mtus:
            cells = {}
            for t in transports:
                values = samples.get(metric.id, {}).get(str(mtu), {}).get(t["id"], [])
                errs = errors.get(metric.id, {}).get(str(mtu), {}).get(t["id"], [])
                if not values and not errs:
                    continue
                cell = {"samples": values, "errors": errs}
                if values:
                    cell.update(median=statistics.median(values), min=min(values), max=max(values))
                cells[t["id"]] = cell
            if not cells:
                continue
            for tid, cell in cells.items():
                if "median" not in cell:
                    continue
                cell["ratio_to"] = {other: cell["median"] / o["median"]
                                    for other, o in cells.items()
                                    if other != tid and o.get("median")}
            rows.append({"metric": metric.id, "label": metric.label, "unit": metric.unit,
                         "higher_is_better": metric.higher_is_better, "table": metric.table,
                         "mtu": mtu, "cells": cells})
    return rows


def _cell(metric: Metric, cell: dict | None, show_ratio: bool, limit: str = LIMIT) -> str:
    if cell is None:
        return "-"
    if "median" not in cell:
        return "failed"
    text = (f"**{metric.format(cell['median'])}** "
            f"({metric.format(cell['min'])}–{metric.format(cell['max'])})")
    if len(cell["samples"]) == 1:
        text = f"**{metric.format(cell['median'])}**"
    if show_ratio and metric.ratios and limit in cell["ratio_to"]:
        text += f" · {cell['ratio_to'][limit]:.2f}×"
    if cell["errors"]:
        text += f" ({len(cell['errors'])} failed)"
    return text


def _ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def is_device(transport_id: str) -> bool:
    return transport_id.startswith("devices-")


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [
        f"Machine: {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}; "
        f"{m['iperf3']}, pasta {m['pasta']}, slirp4netns {m['slirp4netns']}"
        + (f", wg {m['wg']}" if "wg" in m else "") + f"; "
        f"ipferry {m['ipferry_commit']}. Run {result['started']}, took "
        f"{result['wall_seconds'] / 60:.1f} min; load average {m['loadavg_at_start']} at the start "
        f"(the machine is shared).",
        "",
    ]
    runs = f"{cfg['runs']} run{'s' if cfg['runs'] > 1 else ''}"
    proxies = [t for t in result["transports"] if not is_device(t["id"])]
    devices = [t for t in result["transports"] if is_device(t["id"])]
    if proxies:
        caption = (f"Each figure: median of {runs} (min–max). Upload: client (in the transport's "
                   f"namespace) to server; download: iperf3 -R; iperf3 runs of {cfg['duration']} "
                   f"s; connections: {cfg['conns']}, {cfg['concurrency']} at a time; latency: "
                   f"{cfg['round_trips']} round trips; UDP: iperf3 -u -b 0 -l {cfg['udp_size']}. "
                   f"`· 0.33×`: ratio to the veth pair (the limit) in the same row. ")
        lines += _tables(result, proxies, caption, LIMIT, PEERS, "ipferry")
    if devices:
        udp = any(r["metric"].startswith("udp") and any(t["id"] in r["cells"] for t in devices)
                  for r in result["rows"])
        caption = (f"Device to device through a private network: the servers (iperf3 -s, rr.py) "
                   f"in the device holding 10.77.0.2, the clients in another device of the tenant. "
                   f"ipferry: two `ipferry connect` devices of one daemon, TCP as IP packets or "
                   f"as streams (upgraded at the client's tunnel, downgraded into the server's); "
                   f"veth: the two namespaces joined by a veth pair (the limit); WireGuard: "
                   f"kernel WireGuard between them over a veth pair. Each figure: median of "
                   f"{runs} (min–max). Upload: client device to server device; download: "
                   f"iperf3 -R; iperf3 runs of {cfg['duration']} s; connections: {cfg['conns']}, "
                   f"{cfg['concurrency']} at a time; latency: {cfg['round_trips']} round trips"
                   + (f"; UDP: iperf3 -u -b 0 -l {cfg['udp_size']}" if udp else "")
                   + ". `· 0.33×`: ratio to the veth pair between the devices in the same row. ")
        if proxies:
            lines += ["### Device to device", ""]
        lines += _tables(result, devices, caption, DEVICES_LIMIT, DEVICES_PEERS, "devices-")
        carried = [f"{t['label']}: {c['routed_to_device']:.0f} packets routed to the serving "
                   f"device, {c['routed_to_client']:.0f} back, {c['flows_downgraded']:.0f} "
                   f"flows downgraded" for t in devices
                   if (c := result.get("counters", {}).get(t["id"]))]
        if carried:
            lines += ["How the daemons carried them (their metrics at the end): "
                      + "; ".join(carried) + ".", ""]
    if result["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _tables(result: dict, transports: list[dict], caption: str, limit: str,
            peer_ids: tuple[str, ...], ferry_prefix: str) -> list[str]:
    """The main and the CPU table of one set of transports measured against ``limit``."""
    ids = [t["id"] for t in transports]
    ferries = [t for t in transports if t["id"].startswith(ferry_prefix) and t["id"] != limit
               and t["id"] not in peer_ids]
    peers = [p for p in peer_ids if p in ids]
    labels = {t["id"]: t["label"] for t in transports}
    if ferries and peers:
        caption += (f"The last columns divide the ipferry figures "
                    f"({' / '.join(t['label'] for t in ferries)}) by the peer's. ")
    caption += "↑ higher is better, ↓ lower is better."
    lines = [caption, ""]
    for table in ("main", "cpu"):
        rows = [r for r in result["rows"] if r["table"] == table
                and any(t in r["cells"] for t in ids)]
        if not rows:
            continue
        cols = [t for t in transports if table == "main" or t["id"] != limit]
        head = ["workload", "MTU", *(t["label"] for t in cols)]
        head += [f"ipferry ÷ {labels[p]}" if ferry_prefix == "devices-" else f"ipferry ÷ {p}"
                 for p in peers] if ferries else []
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in rows:
            metric = METRIC[r["metric"]]
            arrow = "↑" if metric.higher_is_better else "↓"
            row = [f"{metric.label}, {metric.unit} {arrow}", str(r["mtu"])]
            row += [_cell(metric, r["cells"].get(t["id"]), table == "main", limit) for t in cols]
            for p in peers if ferries else ():
                ratios = [r["cells"].get(f["id"], {}).get("ratio_to", {}).get(p) for f in ferries]
                row.append(" / ".join(_ratio(x) for x in ratios) if metric.ratios else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def chart(result: dict, path: Path) -> None:
    """Throughput and connection rate, grouped by workload and MTU, bars per transport."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = result["transports"]
    panels = [("TCP bulk throughput (Gbit/s, log scale)",
               [m.id for m in METRICS if m.unit == "Gbit/s"], True),
              ("TCP connections per second", ["conn_rate"], False)]
    rows = {(r["metric"], r["mtu"]): r for r in result["rows"]}
    mtus = result["config"]["mtus"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [4, 1.3]})
    for ax, (title, metric_ids, log) in zip(axes, panels, strict=True):
        groups = [(mid, mtu) for mid in metric_ids for mtu in mtus if (mid, mtu) in rows]
        width = 0.8 / max(1, len(transports))
        for i, t in enumerate(transports):
            xs, ys, lo, hi = [], [], [], []
            for g, key in enumerate(groups):
                cell = rows[key]["cells"].get(t["id"])
                if not cell or "median" not in cell:
                    continue
                xs.append(g + (i - (len(transports) - 1) / 2) * width)
                ys.append(cell["median"])
                lo.append(cell["median"] - cell["min"])
                hi.append(cell["max"] - cell["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=t["label"],
                   color=COLORS.get(t["id"], "grey"))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([_short(mid) + f"\nMTU {mtu}" for mid, mtu in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(transports), loc="upper center",
                   bbox_to_anchor=(0.5, -0.14))
    m = result["machine"]
    kinds = {is_device(t["id"]) for t in transports}
    what = ("ipferry vs pasta, slirp4netns and veth" if kinds == {False}
            else "ipferry device to device vs a veth pair between them" if kinds == {True}
            else "ipferry and its peers, device to device where named")
    fig.suptitle(f"{what}: {m['cores']} cores, kernel "
                 f"{m['kernel']}, median of {result['config']['runs']} runs (bars: min-max)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(metric_id: str) -> str:
    if metric_id == "conn_rate":
        return "conn/s"
    _, direction, streams = metric_id.split("_")
    return f"{direction}load ×{streams}"
