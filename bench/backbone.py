#!/usr/bin/env python3
"""Benchmark: ViTDet-B backbone + simple feature pyramid forward at 1024x1024 on CPU,
vitdet vs PyTorch, in one run on the same machine and the same thread count.

    cargo build --release
    python3 bench/backbone.py [--threads 2] [--runs 3]

PyTorch side: the detectron2-equivalent reference modules of tests/fixtures/generate.py
(manual attention with decomposed relative positions, as detectron2's ViT computes it),
float32, eval, no_grad. vitdet side: `vitdet infer --model vitdet-b` on the same weights
(random, written to a temporary safetensors file with detectron2's keys) and the same
1024x768 image. The outputs p2..p6 of both are compared (relative L2 error), so the
benchmark doubles as a full-size correctness check of window padding (64 -> 70 tokens) and
the 64x64 global blocks.
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


def make_inputs(d):
    """A random 1024x768 RGB PNG and the detectron2 preprocessing of it (no resize is needed
    at this size: normalize, then zero-pad bottom/right to 1024x1024)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    path = os.path.join(d, "bench.png")
    Image.fromarray(pixels).save(path)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    x = (torch.from_numpy(pixels).permute(2, 0, 1).float() - mean) / std
    image = torch.zeros(1, 3, 1024, 1024)
    image[0, :, :768, :] = x
    return path, image


def torch_model(weights_path):
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    import generate as ref  # reference modules written from detectron2's semantics

    torch.set_default_dtype(torch.float32)
    net = ref.ViT(img=1024, patch=16, dim=768, depth=12, heads=12, window_size=14,
                  global_blocks=(2, 5, 8, 11), pretrain_img=224, mode="rel_pos")
    model = ref.SimpleFeaturePyramid(net, dim=768, out=256)
    ref.init_weights(model, torch.Generator().manual_seed(0))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, weights_path)
    return ref, model


def torch_side(threads, runs, ref, model, image):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    net = model.net

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
            out = None
            t = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - t)
        _, hwm = rss_status()
    return {"seconds": statistics.median(times), "peak_rss_growth_bytes": hwm - start_rss,
            "torch": torch.__version__, "threads": torch.get_num_threads()}, out


def vitdet_side(threads, runs, weights, image_path, dump):
    binary = os.path.join(ROOT, "target", "release", "vitdet")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    # one extra run serves as the warm-up; the median of all runs is reported
    out = subprocess.run([binary, "--threads", str(threads), "infer", "--model", "vitdet-b", "--weights", weights, "--image", image_path,
                          "--dump", dump, "--repeat", str(runs + 1), "--format", "json"],
                         env=env, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"seconds": r["run_seconds"], "peak_rss_growth_bytes": r["peak_rss_growth_bytes"],
            "peak_live_bytes": r["measured_peak_activation_bytes"],
            "planned_peak_bytes": r["planned_peak_activation_bytes"],
            "seconds_by_op": dict(r["op_seconds"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        weights = os.path.join(d, "vitdet_b.safetensors")
        dump = os.path.join(d, "ours.safetensors")
        image_path, image = make_inputs(d)
        ref, model = torch_model(weights)
        ours = vitdet_side(args.threads, args.runs, weights, image_path, dump)
        theirs, torch_out = torch_side(args.threads, args.runs, ref, model, image)
        our_out = load_file(dump)
    errors = {}
    for k in ("p2", "p3", "p4", "p5", "p6"):
        a, b = our_out[k].double(), torch_out[k].double()
        errors[k] = float((a - b).norm() / b.norm())
    ours["rel_l2_vs_pytorch"] = errors
    gib = 1024 ** 3
    print(json.dumps({"vitdet": ours, "pytorch": theirs}, indent=2))
    print(f"\nViTDet-B backbone+pyramid, 1024x1024, {args.threads} threads, median of {args.runs}")
    print(f"  vitdet   {ours['seconds']:.2f} s   peak RSS growth {ours['peak_rss_growth_bytes'] / gib:.2f} GiB"
          f"   (live tensors {ours['peak_live_bytes'] / gib:.2f} GiB, planned {ours['planned_peak_bytes'] / gib:.2f} GiB)")
    print(f"  pytorch  {theirs['seconds']:.2f} s   peak RSS growth {theirs['peak_rss_growth_bytes'] / gib:.2f} GiB"
          f"   (torch {theirs['torch']})")
    print(f"  time ratio vitdet/pytorch = {ours['seconds'] / theirs['seconds']:.2f}x")
    print("  outputs: relative L2 error vs PyTorch " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
