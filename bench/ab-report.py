#!/usr/bin/env python3
"""Summary of a bench/ab run: for each job, the median IOPS (reads and writes together) of each
module over the rounds, every round's figure, the ratio of B's median to A's, and the longest
single I/O of each side. Usage: ab-report.py <results dir> <label A> <label B>"""
import glob
import json
import os
import re
import statistics
import sys


def main():
    d, labels = sys.argv[1], sys.argv[2:4]
    runs = {}
    for f in sorted(glob.glob(os.path.join(d, "ab-r*-k*-*.json"))):
        m = re.match(r"ab-r(\d+)-k([12])-(.+)\.json$", os.path.basename(f))
        if not m:
            continue
        try:
            job = json.load(open(f))["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            print(f"{f}: no fio result", file=sys.stderr)
            continue
        iops = sum(job[k]["iops"] for k in ("read", "write"))
        longest = max(job[k]["clat_ns"]["max"] for k in ("read", "write")) / 1e6
        r, k, name = int(m.group(1)), int(m.group(2)) - 1, m.group(3)
        runs.setdefault(name, ([], []))[k].append((r, iops, longest))
    if not runs:
        sys.exit("no results")
    print(f"{'job':30s} {'A: ' + labels[0]:>14s} {'B: ' + labels[1]:>14s}  B/A   rounds A | rounds B (K IOPS); longest I/O ms A | B")
    for name, (a, b) in sorted(runs.items()):
        if not a or not b:
            continue
        ma = statistics.median(x[1] for x in a)
        mb = statistics.median(x[1] for x in b)
        fa = " ".join(f"{x[1] / 1000:.1f}" for x in sorted(a))
        fb = " ".join(f"{x[1] / 1000:.1f}" for x in sorted(b))
        la, lb = max(x[2] for x in a), max(x[2] for x in b)
        print(f"{name:30s} {ma / 1000:12.1f} K {mb / 1000:12.1f} K  {mb / ma:4.2f}  {fa} | {fb}; {la:.1f} | {lb:.1f}")


main()
