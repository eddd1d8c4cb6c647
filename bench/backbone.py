#!/usr/bin/env python3
"""Benchmark: ViTDet-B backbone + simple feature pyramid forward at 1024x1024 on CPU,
vitdet vs PyTorch, in one run on the same machine and the same thread count.

    cargo build --release
    python3 bench/backbone.py [--threads 2] [--runs 3]

PyTorch side: the detectron2-equivalent reference modules of tests/fixtures/generate.py
(manual attention with decomposed relative positions, as detectron2's ViT computes it),
float32, eval, no_grad. vitdet side: `vitdet infer --model vitdet-b`, same image size.
Both report the median forward time over --runs after one warm-up, and the peak growth of
the resident set during the timed runs (the kernel's high-water mark reset through
/proc/self/clear_refs, so weights loaded before are not counted).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                fields[k] = int(v.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def torch_side(threads, runs):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    import generate as ref  # reference modules written from detectron2's semantics

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    net = ref.ViT(img=1024, patch=16, dim=768, depth=12, heads=12, window_size=14,
                  global_blocks=(2, 5, 8, 11), pretrain_img=224, mode="rel_pos")
    model = ref.SimpleFeaturePyramid(net, dim=768, out=256).eval()
    image = torch.randn(1, 3, 1024, 1024)

    def forward():
        x = net.patch_embed(image)
        x = x + ref.resize_abs_pos(net.pos_embed, x.shape[1:3])
        for blk in net.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        p = {f"p{s}": getattr(model, f"simfp_{s}")(x) for s in (2, 3, 4, 5)}
        p["p6"] = F.max_pool2d(p["p5"], kernel_size=1, stride=2)
        return p

    with torch.no_grad():
        forward()  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start_rss, _ = rss_status()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - t)
            del out
        _, hwm = rss_status()
    return {"seconds": statistics.median(times), "peak_rss_growth_bytes": hwm - start_rss,
            "torch": torch.__version__}


def vitdet_side(threads, runs):
    from PIL import Image
    import numpy as np

    binary = os.path.join(ROOT, "target", "release", "vitdet")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.png")
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(path)
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        # one extra run serves as the warm-up; the median of the rest is reported
        out = subprocess.run([binary, "infer", "--model", "vitdet-b", "--image", path,
                              "--repeat", str(runs + 1), "--format", "json"],
                             env=env, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"seconds": r["run_seconds"], "peak_rss_growth_bytes": r["peak_rss_growth_bytes"],
            "peak_live_bytes": r["measured_peak_activation_bytes"],
            "planned_peak_bytes": r["planned_peak_activation_bytes"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ours = vitdet_side(args.threads, args.runs)
    theirs = torch_side(args.threads, args.runs)
    gib = 1024 ** 3
    print(json.dumps({"vitdet": ours, "pytorch": theirs}, indent=2))
    print(f"\nViTDet-B backbone+pyramid, 1024x1024, {args.threads} threads, median of {args.runs}")
    print(f"  vitdet   {ours['seconds']:.2f} s   peak RSS growth {ours['peak_rss_growth_bytes'] / gib:.2f} GiB"
          f"   (live tensors {ours['peak_live_bytes'] / gib:.2f} GiB, planned {ours['planned_peak_bytes'] / gib:.2f} GiB)")
    print(f"  pytorch  {theirs['seconds']:.2f} s   peak RSS growth {theirs['peak_rss_growth_bytes'] / gib:.2f} GiB"
          f"   (torch {theirs['torch']})")
    print(f"  time ratio vitdet/pytorch = {ours['seconds'] / theirs['seconds']:.2f}x")


if __name__ == "__main__":
    main()
