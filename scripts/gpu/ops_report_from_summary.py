#!/usr/bin/env python3
"""Rebuilds `vitdet bench --ops --format json` reports from a run.sh summary, for runs whose JSON
reports were not kept: the op list (shapes, FLOPs, bytes) comes from `vitdet bench --ops --list`,
the median times from the summary's op table ("ours ms").

    python3 scripts/gpu/ops_report_from_summary.py SUMMARY.txt --vitdet target/release/vitdet \
        --prefix bench/results/gpu-h200-2026-11-27

writes PREFIX-ops-f32.json and PREFIX-ops-bf16.json (what `vitdet study --calibration` reads).
Only the first op table of the summary is read (the default convolution engine).
"""

import argparse
import json
import os
import re
import subprocess
import tempfile


def summary_medians(path):
    """{(name, dtype): median ms} from the first op table of a run.sh summary."""
    medians, inside = {}, False
    with open(path) as f:
        for line in f:
            cells = line.split()
            if cells[:3] == ["op", "dtype", "ours"]:
                if inside:
                    break
                inside = True
                continue
            if inside:
                if len(cells) < 3:
                    if medians:
                        break
                    continue
                try:
                    medians[(cells[0], cells[1])] = float(cells[2])
                except ValueError:
                    pass  # a failed row ("fail")
    if not medians:
        raise SystemExit(f"{path}: no op table found")
    return medians


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summary")
    p.add_argument("--vitdet", default="vitdet")
    p.add_argument("--prefix", required=True)
    p.add_argument("--gpu", help="the GPU's name (default: the summary's header, 'one NVIDIA ... (')")
    args = p.parse_args()
    medians = summary_medians(args.summary)
    gpu = args.gpu
    if gpu is None:
        with open(args.summary) as f:
            found = re.search(r"one (NVIDIA [^(,]+?) \(", f.read())
        if not found:
            raise SystemExit(f"{args.summary}: no GPU name in the header; pass --gpu")
        gpu = found.group(1)
    for dtype in sorted({d for _, d in medians}):
        listed = json.loads(
            subprocess.run(
                [args.vitdet, "bench", "--ops", "--list", "--format", "json", "--dtype", dtype],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        ops = []
        for case in listed["ops"]:
            ms = medians.get((case["name"], dtype))
            if ms is not None:
                ops.append({**case, "median_ms": ms})
        report = {
            "device": "cuda",
            "gpu": gpu,
            "source": f"median times from {os.path.basename(args.summary)} (run.sh summary)",
            "dtype": dtype,
            "scale": listed["scale"],
            "ops": ops,
        }
        out = f"{args.prefix}-ops-{dtype}.json"
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out) or ".")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        print(f"{out}: {len(ops)} ops")


if __name__ == "__main__":
    main()
