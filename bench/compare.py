#!/usr/bin/env python3
"""Prints the kiln-against-PyTorch table from the JSON reports that bench/run.sh and bench/gpu.sh
write: DIR/CASE-kiln-R.json and DIR/CASE-torch-R.json for rounds R = 1, 2, ...

    python3 bench/compare.py DIR CASE [CASE ...]

Tokens/s: min, median and max over rounds of each round's median step; memory: the largest peak
over rounds (device memory reserved on a GPU; on the CPU the process's peak resident memory,
loading included, as PyTorch's ru_maxrss counts it); first step: the median
over rounds of the seconds from the program's start to the end of its first step.
"""
import json
import pathlib
import platform
import statistics
import sys

M = 2**20


def load(d, case, who):
    runs = []
    for p in sorted(d.glob(f"{case}-{who}-*.json")):
        try:
            runs.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            print(f"{p.name}: no report (see {p.with_suffix('.err').name})")
    return runs


def peak(run):
    if run.get("peak_device_bytes"):
        return run["peak_device_bytes"], "device"
    return run.get("peak_rss_bytes") or 0, "RSS"


def main():
    d = pathlib.Path(sys.argv[1])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"host: {cpu}, {len(open('/proc/cpuinfo').read().split('processor')) - 1} logical CPUs")
    for case in sys.argv[2:]:
        k, t = load(d, case, "kiln"), load(d, case, "torch")
        if not k or not t:
            print(f"{case}: missing reports")
            continue
        dev = k[0].get("device", "?")
        tdev = t[0].get("device", f"cpu, {t[0].get('threads')} threads")
        print(f"\n{case}: {len(k)} alternating rounds; kiln on {dev}; PyTorch on {tdev}; "
              f"{k[0].get('tokens_per_step')} tokens per step")
        print(f"{'':18} {'min':>9} {'median':>9} {'max':>9}  tokens/s   {'peak memory':>16}  first step")
        rows = []
        for name, runs in (("kiln", k), (t[0]["framework"], t)):
            v = [x["median_tokens_per_s"] for x in runs]
            p, what = max(peak(x) for x in runs)
            first = statistics.median(x["first_step_secs"] for x in runs)
            rows.append((statistics.median(v), p))
            print(f"{name[:18]:18} {min(v):9.1f} {statistics.median(v):9.1f} {max(v):9.1f}            "
                  f"{p / M:9.1f} MiB {what:6} {first:6.2f} s")
        (kt, kp), (tt, tp) = rows
        print(f"ratio kiln / PyTorch: tokens/s {kt / tt:.2f}x (median), peak memory {kp / tp:.2f}x")


if __name__ == "__main__":
    main()
