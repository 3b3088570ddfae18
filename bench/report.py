#!/usr/bin/env python3
"""Turn one bench/run boot's fio JSON files into the comparison table and chart.

    bench/report.py <raw run dir> <results dir>

Reads <raw>/<round>-<config>-<job>.json (fio --output-format=json, unified_rw_reporting=mixed),
<raw>/settings.env, <raw>/guest.txt and <raw>/unavailable.txt. Writes to <results dir>:
  runs.csv     every run: round, config, job, IOPS, mean and p99 latency
  results.csv  per configuration and job: medians of the rounds, their spread, and each figure's
               ratio to the C pcache on the same job
  results.md   the same as Markdown, with the settings and a compact IOPS-ratio table
  iops.png     IOPS per configuration and job (medians, min-max bars), and the ratio to C pcache
The chart needs matplotlib; without it the tables are still written.
"""

import csv
import json
import os
import re
import shlex
import statistics
import sys

# Display order; anything else measured is appended.
CONFIG_ORDER = ["pmem", "backing", "pcache_rs", "pcache", "pcache_rs_crc", "pcache_crc",
                "writecache", "bcache"]
CONFIG_LABEL = {
    "pmem": "raw pmem",
    "backing": "backing (brd+delay)",
    "pcache_rs": "pcache_rs",
    "pcache": "pcache (C)",
    "pcache_rs_crc": "pcache_rs crc",
    "pcache_crc": "pcache (C) crc",
    "writecache": "writecache",
    "bcache": "bcache",
}
WORKLOADS = ["randread", "randrw", "randwrite", "seqwrite"]
VARIANTS = ["nj1-qd1", "nj2-qd1", "nj1-qd16", "nj2-qd16"]
WORKLOAD_LABEL = {"randread": "4k randread", "randrw": "4k randrw 70/30",
                  "randwrite": "4k randwrite", "seqwrite": "128k seqwrite"}
VARIANT_LABEL = {"nj1-qd1": "1 job psync", "nj2-qd1": "2 jobs psync",
                 "nj1-qd16": "1 job io_uring qd16", "nj2-qd16": "2 jobs io_uring qd16"}
# Short two-line labels for the chart's x axis.
CHART_VARIANT = {"nj1-qd1": "1 job psync", "nj2-qd1": "2 jobs psync",
                 "nj1-qd16": "1 job uring16", "nj2-qd16": "2 jobs uring16"}
CHART_WORKLOAD = {"randread": "4k rand read", "randrw": "4k rand 70/30",
                  "randwrite": "4k rand write", "seqwrite": "128k seq write"}
BASELINE = "pcache"
NAME_RE = re.compile(r"^(\d+)-(.+)-(" + "|".join(WORKLOADS) + r")-(" + "|".join(VARIANTS) + r")\.json$")


def job_label(job):
    w, v = job.split("-", 1)
    return f"{WORKLOAD_LABEL.get(w, w)}, {VARIANT_LABEL.get(v, v)}"


def read_kv(path, shell=False):
    """key=value lines; shell=True for bench/run's settings.env, whose values are printf %q quoted."""
    kv = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    if shell:
                        try:
                            v = " ".join(shlex.split(v))
                        except ValueError:
                            pass
                    kv[k] = v.strip("'\"")
    return kv


def load_runs(raw):
    runs = []
    for name in sorted(os.listdir(raw)):
        m = NAME_RE.match(name)
        if not m:
            continue
        rnd, config, w, v = m.groups()
        try:
            with open(os.path.join(raw, name)) as f:
                job = json.load(f)["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            print(f"report: skipping {name}: {e}", file=sys.stderr)
            continue
        if job.get("error"):
            continue
        mixed = job["mixed"]
        lat = mixed["lat_ns"]
        runs.append({
            "round": int(rnd), "config": config, "job": f"{w}-{v}",
            "iops": mixed["iops"],
            "mean_us": lat["mean"] / 1000.0,
            "p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1000.0,
            "max_ms": lat.get("max", 0) / 1e6,
        })
    return runs


def summarise(runs):
    """Medians over the rounds per (config, job), with min/max IOPS and ratios to the baseline."""
    groups = {}
    for r in runs:
        groups.setdefault((r["config"], r["job"]), []).append(r)
    rows = {}
    for (config, job), rs in groups.items():
        iops = [r["iops"] for r in rs]
        rows[(config, job)] = {
            "config": config, "job": job, "rounds": len(rs),
            "iops": statistics.median(iops), "iops_min": min(iops), "iops_max": max(iops),
            "mean_us": statistics.median(r["mean_us"] for r in rs),
            "p99_us": statistics.median(r["p99_us"] for r in rs),
            "max_ms": max(r["max_ms"] for r in rs),
        }
    for (config, job), row in rows.items():
        base = rows.get((BASELINE, job))
        for k in ("iops", "mean_us", "p99_us"):
            row[k + "_ratio"] = (row[k] / base[k]) if base and base[k] else None
    return rows


def config_key(c):
    return (CONFIG_ORDER.index(c) if c in CONFIG_ORDER else 99, c)


def ordered(rows):
    configs = sorted({c for c, _ in rows}, key=config_key)
    jobs = [f"{w}-{v}" for w in WORKLOADS for v in VARIANTS if any(j == f"{w}-{v}" for _, j in rows)]
    return configs, jobs


def fmt_num(x):
    if x is None:
        return ""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}"


def fmt_ratio(x):
    return "" if x is None else f"{x:.2f}x"


def write_csv(path, fields, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})


def pmem_host(where):
    """Where the host kept the NVDIMM's file, as the report says it."""
    return {
        "ram": "RAM (`/dev/shm`)",
        "disk": "a file on disk (the host's writeback of it stalls the guest: figures vary more)",
    }.get(where, "an unrecorded place")


def settings_text(settings, guest, unavailable, measured):
    lines = [
        f"- One boot, {guest.get('cpus', '?')} vCPUs, kernel `{guest.get('kernel', '?')}`"
        f" ({settings.get('ACCEL', 'TCG')}), {guest.get('fio', 'fio')}."
        + (f" Kernel build `{guest['kernel_build']}`." if guest.get("kernel_build") else ""),
        f"- Cache device: emulated NVDIMM `/dev/pmem0` (fsdax), {guest.get('pmem_mib', '?')} MiB, "
        f"its file on the host in {pmem_host(guest.get('pmem_host'))}.",
        f"- Backing device: brd RAM disk, {guest.get('backing_mib', '?')} MiB, behind `dm-delay` with "
        f"{settings.get('DELAY_MS', '?')} ms on reads, writes and flushes.",
        f"- Working set {settings.get('WSS_MIB', '?')} MiB (written sequentially before each configuration's"
        f" jobs); each run {settings.get('RAMP', '?')} s ramp + {settings.get('RUNTIME', '?')} s measured,"
        f" O_DIRECT; {settings.get('ROUNDS', '?')} round{'' if settings.get('ROUNDS') == '1' else 's'},"
        " configurations interleaved (order rotated each"
        " round); figures are medians of the rounds.",
        "- Latency: fio total latency (submission to completion); p99 from fio's percentiles; max: the"
        " longest single I/O in any round (a p99 below the mean means a few very long stalls).",
        "- Ratios are to the C `pcache` on the same job (IOPS: higher is better; latency: lower is"
        " better).",
        f"- pcache_rs built from {settings.get('RS_SOURCE', '?')}.",
    ]
    if settings.get("ACCEL", "TCG") == "TCG":
        lines.append("- **The VM runs under TCG (no KVM): absolute figures are emulation speeds. Only"
                     " ratios between configurations measured in the same boot mean anything.**")
    for config, reason in unavailable:
        if config in measured:
            lines.append(f"- **{CONFIG_LABEL.get(config, config)}: failed in some rounds** ({reason});"
                         " its figures are from the other rounds.")
        else:
            lines.append(f"- **{CONFIG_LABEL.get(config, config)}: not available** ({reason}).")
    return "\n".join(lines)


# The performance targets the project set itself (issue 13), checked against the medians.
TARGET_VS_C = 1.10  # pcache_rs IOPS against the C pcache, every job, with p99 no worse
TARGET_SCALE = 1.4  # 4k randwrite psync: 2 jobs against 1 job
TARGET_CRC = 0.75  # pcache_rs with data_crc against without, every job


def targets_section(rows, jobs):
    """The targets, one line each: the figures they compare and whether the medians meet them.
    A target whose configurations were not all measured is left out."""
    def row(c, j):
        return rows.get((c, j))

    checks = []  # (target, measured, met)
    for job in jobs:
        rs, c = row("pcache_rs", job), row("pcache", job)
        if rs and c and c["iops"] and c["p99_us"]:
            ratio, p99 = rs["iops"] / c["iops"], rs["p99_us"] / c["p99_us"]
            checks.append((f"{job_label(job)}: pcache_rs / C pcache >= {TARGET_VS_C:.2f}x, p99 no worse",
                           f"{ratio:.2f}x, p99 {p99:.2f}x", ratio >= TARGET_VS_C and p99 <= 1.0))
    for job in jobs:
        rs, wc = row("pcache_rs", job), row("writecache", job)
        if job.startswith("randwrite-") and rs and wc and wc["iops"]:
            ratio = rs["iops"] / wc["iops"]
            checks.append((f"{job_label(job)}: pcache_rs / dm-writecache >= 1.00x", f"{ratio:.2f}x",
                           ratio >= 1.0))
    one, two = row("pcache_rs", "randwrite-nj1-qd1"), row("pcache_rs", "randwrite-nj2-qd1")
    if one and two and one["iops"]:
        ratio = two["iops"] / one["iops"]
        checks.append((f"4k randwrite psync, pcache_rs: 2 jobs / 1 job >= {TARGET_SCALE:.1f}x",
                       f"{ratio:.2f}x", ratio >= TARGET_SCALE))
    for job in jobs:
        rs, crc = row("pcache_rs", job), row("pcache_rs_crc", job)
        if rs and crc and rs["iops"]:
            ratio = crc["iops"] / rs["iops"]
            checks.append((f"{job_label(job)}: pcache_rs crc / pcache_rs >= {TARGET_CRC:.2f}x",
                           f"{ratio:.2f}x", ratio >= TARGET_CRC))
    if not checks:
        return []
    met = sum(1 for _, _, ok in checks if ok)
    return (["## Targets (medians of the rounds)", "", f"{met} of {len(checks)} met.", "",
             "| target | measured | |", "|---|---:|---|"]
            + [f"| {t} | {m} | {'met' if ok else '**missed**'} |" for t, m, ok in checks] + [""])


def write_markdown(path, rows, settings, guest, unavailable, elapsed):
    configs, jobs = ordered(rows)
    # Configurations that could not be measured still get their column, marked n/a.
    configs = sorted(set(configs) | {c for c, _ in unavailable}, key=config_key)
    out = ["# dm-pcache-rs benchmark: pcache_rs against C dm-pcache, dm-writecache, bcache and raw pmem",
           "", f"Generated by `bench/run` on {settings.get('STAMP', '?')}"
           + (f" (took {elapsed})" if elapsed else "") + ".", "",
           settings_text(settings, guest, unavailable, {c for c, _ in rows}), ""]

    out += ["## IOPS relative to C pcache (median of rounds)", ""]
    out.append("| job | " + " | ".join(CONFIG_LABEL.get(c, c) for c in configs) + " |")
    out.append("|---|" + "---:|" * len(configs))
    for job in jobs:
        cells = []
        for c in configs:
            r = rows.get((c, job))
            if r is None:
                cells.append("n/a")
            elif c == BASELINE:
                cells.append(f"{fmt_num(r['iops'])} IOPS")
            else:
                cells.append(fmt_ratio(r["iops_ratio"]) or fmt_num(r["iops"]))
        out.append(f"| {job_label(job)} | " + " | ".join(cells) + " |")
    out.append("")

    out += targets_section(rows, jobs)

    out += ["## All figures", "",
            "| job | configuration | IOPS | vs pcache | IOPS min-max | mean lat us | vs pcache"
            " | p99 lat us | vs pcache | max lat ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for job in jobs:
        for c in configs:
            r = rows.get((c, job))
            if r is None:
                continue
            out.append(
                f"| {job_label(job)} | {CONFIG_LABEL.get(c, c)} | {fmt_num(r['iops'])} | "
                f"{fmt_ratio(r['iops_ratio'])} | {fmt_num(r['iops_min'])}-{fmt_num(r['iops_max'])} | "
                f"{fmt_num(r['mean_us'])} | {fmt_ratio(r['mean_us_ratio'])} | {fmt_num(r['p99_us'])} | "
                f"{fmt_ratio(r['p99_us_ratio'])} | {fmt_num(r['max_ms'])} |")
    out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_chart(path, rows, settings, unavailable):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib not available, no chart", file=sys.stderr)
        return False
    configs, jobs = ordered(rows)
    if not configs or not jobs:
        return False
    colours = {"pmem": "#7f7f7f", "backing": "#c7c7c7", "pcache_rs": "#d62728", "pcache": "#1f77b4",
               "pcache_rs_crc": "#ff9896", "pcache_crc": "#aec7e8", "writecache": "#2ca02c",
               "bcache": "#ff7f0e"}
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(max(16, 1.2 * len(jobs)), 10), height_ratios=[3, 2], sharex=True)
    width = 0.8 / len(configs)
    xs = range(len(jobs))
    for i, c in enumerate(configs):
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        med = [rows[(c, j)]["iops"] if (c, j) in rows else 0 for j in jobs]
        lo = [m - rows[(c, j)]["iops_min"] if (c, j) in rows else 0 for m, j in zip(med, jobs)]
        hi = [rows[(c, j)]["iops_max"] - m if (c, j) in rows else 0 for m, j in zip(med, jobs)]
        ax.bar(pos, med, width, yerr=[lo, hi], capsize=2, label=CONFIG_LABEL.get(c, c),
               color=colours.get(c), edgecolor="black", linewidth=0.3, error_kw={"linewidth": 0.7})
        if c not in ("pmem", "backing"):
            ratios = [rows[(c, j)]["iops_ratio"] if (c, j) in rows and rows[(c, j)]["iops_ratio"]
                      else 0 for j in jobs]
            axr.bar(pos, ratios, width, color=colours.get(c), edgecolor="black", linewidth=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("IOPS (median of rounds, bars: min-max)")
    missing = [CONFIG_LABEL.get(c, c) for c, _ in unavailable]
    accel = settings.get("ACCEL", "TCG")
    title = (f"fio IOPS per configuration, one boot ({accel}; backing = brd + dm-delay "
             f"{settings.get('DELAY_MS', '?')} ms)")
    if accel == "TCG":
        title += "\nTCG emulation: only ratios within this boot are meaningful"
    if missing:
        title += "\nnot available: " + ", ".join(missing)
    fig.suptitle(title)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(configs), fontsize=9, loc="upper center",
               bbox_to_anchor=(0.5, 0.915 if "\n" in title else 0.95))
    ax.grid(axis="y", which="both", alpha=0.3)
    axr.axhline(1.0, color="black", linewidth=0.8)
    axr.set_ylabel("IOPS / C pcache")
    axr.grid(axis="y", alpha=0.3)
    axr.set_xticks(list(xs))
    axr.set_xticklabels([f"{CHART_WORKLOAD.get(w, w)}\n{CHART_VARIANT.get(v, v)}"
                         for w, v in (j.split("-", 1) for j in jobs)], fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if "\n" in title else 0.93))
    fig.savefig(path, dpi=110)
    return True


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    raw, results = sys.argv[1], sys.argv[2]
    os.makedirs(results, exist_ok=True)
    settings = read_kv(os.path.join(raw, "settings.env"), shell=True)
    guest = read_kv(os.path.join(raw, "guest.txt"))
    unavailable = []
    up = os.path.join(raw, "unavailable.txt")
    if os.path.exists(up):
        with open(up) as f:
            seen = set()
            for line in f:
                config, _, reason = line.rstrip("\n").partition("\t")
                if config and config not in seen:
                    seen.add(config)
                    unavailable.append((config, reason))
    elapsed = ""
    ep = os.path.join(raw, "elapsed")
    if os.path.exists(ep):
        s = int(open(ep).read().strip() or 0)
        elapsed = f"{s // 60} min {s % 60} s"

    runs = load_runs(raw)
    if not runs:
        print("report: no fio results found in " + raw, file=sys.stderr)
        return 1
    rows = summarise(runs)
    configs, jobs = ordered(rows)

    write_csv(os.path.join(results, "runs.csv"),
              ["round", "config", "job", "iops", "mean_us", "p99_us", "max_ms"],
              sorted(runs, key=lambda r: (r["round"], r["config"], r["job"])))
    fields = ["config", "job", "rounds", "iops", "iops_ratio", "iops_min", "iops_max", "mean_us",
              "mean_us_ratio", "p99_us", "p99_us_ratio", "max_ms"]
    write_csv(os.path.join(results, "results.csv"), fields,
              [rows[(c, j)] for j in jobs for c in configs if (c, j) in rows])
    write_markdown(os.path.join(results, "results.md"), rows, settings, guest, unavailable, elapsed)
    chart = write_chart(os.path.join(results, "iops.png"), rows, settings, unavailable)
    print(f"report: {len(runs)} runs, {len(configs)} configurations, {len(jobs)} jobs -> {results}/"
          f"{{runs.csv,results.csv,results.md{',iops.png' if chart else ''}}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
