"""Before/after for ipferry's rows: two bench/run JSON files side by side, with veth for scale.

    .venv/bin/python bench/compare.py bench/published/before.json bench/published/benchmark.json
    .venv/bin/python bench/compare.py b1.json,b2.json a1.json,a2.json   # runs pooled per side

Runs pooled per side (comma-separated files) cancel some of the machine's drift when they were
taken in turns (before, after, after, before): every cell's samples are pooled, its median,
minimum and maximum taken over all of them.

Each run's own veth median is shown too: the two runs were on the same machine but at different
times, so a change of the limit means the machine was busier or quieter, not ipferry.

The verdict is against the noise of the row itself, its samples' min-max: *worse* when every
sample after is worse than every sample before (the ranges do not overlap), *worse median* when
only the after median is worse than every sample before, *better* and *better median* the other
way round, else *noise*. ``--fail-worse`` exits 1 when a row is worse.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(paths: str) -> dict:
    """One bench/run JSON, or several pooled: each cell's samples together, re-summarised."""
    runs = [json.loads(Path(p).read_text()) for p in paths.split(",")]
    pooled = runs[0]
    if len(runs) == 1:
        return pooled
    index = [{(r["metric"], r["mtu"]): r for r in run["rows"]} for run in runs[1:]]
    for row in pooled["rows"]:
        for transport, c in row["cells"].items():
            samples = list(c.get("samples") or [])
            for other in index:
                o = other.get((row["metric"], row["mtu"]), {}).get("cells", {}).get(transport)
                samples += (o or {}).get("samples") or []
            samples = [x for x in samples if x is not None]
            if samples:
                c.update(samples=samples, median=statistics.median(samples), min=min(samples),
                         max=max(samples))
    pooled["machine"]["ipferry_commit"] = "+".join(r["machine"]["ipferry_commit"] for r in runs)
    pooled["config"]["runs"] = sum(r["config"]["runs"] for r in runs)
    return pooled


def cell(row: dict, transport: str) -> dict | None:
    c = row["cells"].get(transport)
    return c if c and c.get("median") is not None else None


def fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a bench/run JSON file, or several joined by commas")
    parser.add_argument("after", help="the same, after")
    parser.add_argument("--transport", action="append",
                        help="rows to compare (default ipferry-w1 and ipferry-w2)")
    parser.add_argument("--fail-worse", action="store_true", help="exit 1 if a row is worse")
    args = parser.parse_args()
    before, after = load(args.before), load(args.after)
    transports = args.transport or ["ipferry-w1", "ipferry-w2"]
    rows_before = {(r["metric"], r["mtu"]): r for r in before["rows"]}
    print(f"before: {before['machine']['ipferry_commit']}, after: "
          f"{after['machine']['ipferry_commit']}; medians of {after['config']['runs']} runs\n")
    print("| workload | MTU | transport | before (min-max) | after (min-max) | after/before | verdict "
          "| veth before / after |")
    print("|---|---|---|---|---|---|---|---|")
    worse = 0
    for row in after["rows"]:
        old = rows_before.get((row["metric"], row["mtu"]))
        if old is None:
            continue
        for t in transports:
            a, b = cell(row, t), cell(old, t)
            if not a or not b:
                continue
            va, vb = cell(row, "veth"), cell(old, "veth")
            limit = f"{fmt(vb['median'])} / {fmt(va['median'])}" if va and vb else "-"
            change = a["median"] / b["median"] if b["median"] else float("nan")
            v = verdict(a, b, row.get("higher_is_better", True))
            worse += v == "worse"
            print(f"| {row['label']} ({row['unit']}) | {row['mtu']} | {t} | {spread(b)} | "
                  f"{spread(a)} | {change:.2f}x | {v} | {limit} |")
    if args.fail_worse and worse:
        raise SystemExit(f"{worse} row(s) worse than their own noise")


def spread(c: dict) -> str:
    lo, hi = c.get("min", c["median"]), c.get("max", c["median"])
    return f"{fmt(c['median'])} ({fmt(lo)}-{fmt(hi)})"


def verdict(after: dict, before: dict, higher_is_better: bool) -> str:
    """The after samples against the before samples' range (see the module's docstring)."""
    lo, hi = before.get("min", before["median"]), before.get("max", before["median"])
    a_lo, a_hi = after.get("min", after["median"]), after.get("max", after["median"])
    m = after["median"]
    if not higher_is_better:  # flip, so that "up" is "better" below
        lo, hi, a_lo, a_hi, m = -hi, -lo, -a_hi, -a_lo, -m
    if a_hi < lo:
        return "worse"
    if a_lo > hi:
        return "better"
    return "worse median" if m < lo else "better median" if m > hi else "noise"


if __name__ == "__main__":
    main()
