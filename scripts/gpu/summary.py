#!/usr/bin/env python3
"""The short table scripts/gpu/run.sh prints last, from the results in its $OUT folder:
step exit statuses, vitdet's op times beside PyTorch's, and the end-to-end steps.

    python3 scripts/gpu/summary.py OUT
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ops import compare_table  # noqa: E402  (imports torch only to time)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    out = sys.argv[1]
    print("== steps (exit 124: timed out)")
    try:
        with open(os.path.join(out, "status.tsv")) as f:
            for line in f:
                name, rc, seconds = line.rstrip("\n").split("\t")
                print(f"{name:<40} {'ok' if rc == '0' else 'exit ' + rc:>8} {seconds:>5} s")
    except OSError:
        print("no status.tsv")
    # compute-sanitizer's verdicts (step 8 of run.sh).
    logs_dir = os.path.join(out, "logs")
    for name in sorted(os.listdir(logs_dir)) if os.path.isdir(logs_dir) else []:
        if name.startswith("sanitize_"):
            with open(os.path.join(logs_dir, name), errors="replace") as f:
                verdicts = [line.strip() for line in f if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
            print(f"{name[:-4]}: {'; '.join(verdicts) if verdicts else 'no summary line (see the log)'}")
    try:
        with open(os.path.join(out, "attention_fallback.txt")) as f:
            print("\nNOTE: " + f.read().strip())
    except OSError:
        pass

    # The tests' CPU-vs-GPU errors of whole models (tests/cuda_end_to_end.rs).
    logs = os.path.join(out, "logs")
    errors = []
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        if name.startswith("test_"):
            with open(os.path.join(logs, name), errors="replace") as f:
                errors += [line.rstrip() for line in f if line.startswith("cpu-vs-gpu ")]
    if errors:
        print("\n== same weights and image on the CPU and the GPU (relative L2)")
        print("\n".join(errors))

    ours = [r for r in (load(os.path.join(out, f"ops_{d}.json")) for d in ("f32", "bf16")) if r]
    theirs = load(os.path.join(out, "torch_ops.json")) or {"ops": []}
    if ours:
        scale = ours[0].get("scale", 1)
        at = "1024" if scale == 1 else f"1024 / {scale}"
        engines = sorted({r.get("conv_engine", "?") for r in ours})
        print(f"\n== ops, ViTDet-B at {at} (ratio = vitdet / torch {theirs.get('torch', '?')}, median ms)")
        print(f"convolutions on {', '.join(engines)}")
        print(compare_table(ours, theirs))
        for name, what in [
            ("ops_bf16_im2col.json", "the convolutions on the im2col kernel + cuBLAS instead"),
            ("ops_bf16_fma.json", "the attention on the FMA kernels instead (VITDET_ATTENTION_KERNELS=fma)"),
        ]:
            again = load(os.path.join(out, name))
            if again:
                print(f"\n{what}:")
                print(compare_table([again], theirs))
        for report in ours:
            for r in report["ops"]:
                if "error" in r:
                    print(f"vitdet {r['name']} {r['dtype']}: {r['error'][:200]}")
        for r in theirs["ops"]:
            if "error" in r:
                print(f"torch {r['name']} {r['dtype']}: {r['error'][:200]}")

    print("\n== end to end at 1024")
    runs = [("vitdet-b", "infer", "bf16"), ("vitdet-b", "train", "bf16"), ("vitdet-b", "train", "f32")]
    runs += [(m, mode, "bf16") for m in ("vitdet-l", "vit-b", "vit-l") for mode in ("infer", "train")]
    for model, mode, dtype in runs:
        name = f"e2e_{model}_{mode}_{dtype}"
        r = load(os.path.join(out, f"{name}.json"))
        mode = f"{model} {mode}"
        if r is None:
            print(f"{mode} {dtype}: no result (see logs/{name}.log)")
            continue
        gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
        print(
            f"{mode} {dtype} (convolutions: {r.get('conv_engine', '?')}): median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}), "
            f"peak {gib(r.get('peak_bytes'))} besides weights, planned arena {gib(r['planned_arena_bytes'])}"
            + (f" ({gib(r['planned_arena_bytes_at_rows'])} at the run's {r['dynamic_rows']} dynamic rows)" if r.get("dynamic_rows") else "")
        )
        run_mode = name.split("_")[-2]
        predicted = (load(os.path.join(out, f"predicted_{model}_{run_mode}_{dtype}.json")) or {}).get("predicted_time")
        if predicted:
            ms = predicted["seconds"] * 1e3
            print(
                f"  predicted {ms:.1f} ms on {predicted['profile']} (measured / predicted {r['median_ms'] / ms:.2f}; "
                f"{predicted['pass'].get('assumed_seconds', 0) * 1e3:.1f} ms at assumed efficiencies)"
            )
            # The same op times carried to the H100 (run.sh writes it on an H200), scaled by
            # this GPU's measured / predicted ratio.
            there = (load(os.path.join(out, f"predicted_h100_{model}_{run_mode}_{dtype}.json")) or {}).get(
                "predicted_time"
            )
            if there:
                h100 = there["seconds"] * 1e3
                print(
                    f"  predicted {h100:.1f} ms on {there['profile']}; "
                    f"times this GPU's measured / predicted: {h100 * r['median_ms'] / ms:.1f} ms"
                )
        ops = r.get("ops", [])
        fmt = lambda v: "       -   " if v is None else f"{v:8.2f} ms"
        if ops:
            host = sum(o["host_ms"] for o in ops)
            synced = sum(o.get("synced_ms") or 0.0 for o in ops)
            print(f"  issuing all ops: {host:.1f} ms on the host; profiled, device waited after each: {synced:.1f} ms")
            if any(o.get("device_ms") is not None for o in ops):
                device = sum(o.get("device_ms") or 0.0 for o in ops)
                print(f"  device clock (events between the nodes of an unsynced run): {device:.1f} ms in all")
            if r.get("device_clock_error"):
                print(f"  device clock failed: {r['device_clock_error'][:300]}")
            for o in ops[:10]:
                print(
                    f"  {o['op']:<26} x{o['count']:<5} host {o['host_ms']:8.2f} ms  synced {fmt(o.get('synced_ms'))}"
                    f"  device {fmt(o.get('device_ms'))}"
                )
        for sc in r.get("scopes", [])[:8]:
            print(
                f"  scope {sc['scope']:<38} host {sc['host_ms']:8.2f} ms  synced {fmt(sc.get('synced_ms'))}"
                f"  device {fmt(sc.get('device_ms'))}"
            )

    for variant in ("eager", "fused"):
        study = os.path.join(out, f"study_vitdet_l_{variant}.txt")
        if os.path.exists(study):
            print(f"\n== Table 3: vitdet study --model vitdet-l --measure --device cuda ({variant} attention)")
            with open(study) as f:
                print(f.read().rstrip())

if __name__ == "__main__":
    main()
