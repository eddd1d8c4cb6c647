#!/usr/bin/env python3
"""One training iteration of ViTDet-B Mask R-CNN at 1024x1024, batch 1, on the CPU: vitdet's
`vitdet train` against detectron2's own model and optimizer, in one run on the same machine.

    cargo build --release
    python3 bench/train_compare.py --detectron2 /path/to/detectron2-checkout [--threads 2]
        [--warmup 1] [--runs 3] [--save results.json] [--skip-vitdet | --skip-detectron2]

What is compared: the wall time of one training iteration (forward to the five losses, backward,
AdamW step; median of `--runs` iterations after `--warmup` untimed ones) and the peak resident
set of the whole process, each framework in its own subprocess so their peaks do not mix. The
peak is the kernel's high-water mark of the child (`ru_maxrss` from `wait4`), measured the same
way for both; it includes the weights, gradients and AdamW state, and for detectron2 the Python
interpreter and the torch and detectron2 libraries (their resident size before the model is
built is reported separately).

detectron2 side (detectron2 is not on PyPI: pass a source checkout; its C++ extension is not
needed, as in bench/detectron2_compare.py): `projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`
built with LazyConfig in training mode, with its default initialization and `roi_heads.num_classes`
set to `--num-classes` (default 4, the class count of `vitdet data synth`, so both heads have the
same size), the config's AdamW (layer-wise lr decay 0.7, no weight decay on norms and position
embeddings), and one synthetic 1024x1024 RGB image with a few ground-truth instances built
directly as detectron2's `DatasetMapper` would hand them to the model after LSJ: `gt_boxes` (the
masks' tight boxes, as `recompute_boxes=True` gives), `gt_classes`, and `gt_masks` as
`PolygonMasks` (the COCO mapper's default `instance_mask_format`; `--mask-format bitmask` gives
`BitMasks`). One iteration is what detectron2's `SimpleTrainer.run_step` does: the model's loss
dict, its sum, `zero_grad`, `backward`, `step`. Data loading is not timed (the batch is built
once).

vitdet side: the release binary `target/release/vitdet` (build it first), as
`vitdet --threads N train --model vitdet-b --data DIR --out RUN --iters warmup+runs --batch 1
--seed S --checkpoint-every BIG` on a dataset written by `vitdet data synth --size 1024`;
per-iteration seconds are read from `RUN/metrics.jsonl`. Each of those seconds includes loading and
augmenting that iteration's image (vitdet's LSJ loader: flip, random scale 0.1-2.0, crop/pad to
1024x1024) as well as the forward, backward and AdamW step; the checkpoint written after the last
iteration is outside the timed iterations but inside the process, so the peak is also read just
as the last iteration's metrics line appears (polling /proc every 50 ms) and reported beside the
whole-process peak.

Differences that remain: detectron2 trains in float32 here (the config enables AMP, which is a
GPU setting); both run detectron2's drop path 0.1. Both run the mask head only on the sampled
foreground RoIs (reported as `fg_rois`; vitdet's from `roi_head/num_fg_samples` in its
metrics.jsonl), whose number depends on the image and the weights. The two images
differ (detectron2: the synthetic picture below, unaugmented; vitdet: its synthetic dataset through
its LSJ loader), but both are 1024x1024 inputs to shape-static or image-size-bound computations,
so the work per iteration does not depend on the picture beyond the number of foreground RoIs.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def proc_status(pid="self"):
    """VmRSS and VmHWM of a process in bytes (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def synthetic_instances(size, num_classes):
    """A noisy, smoothly shaded RGB picture with three filled shapes, and their polygons and classes.
    Shapes do not overlap, so each polygon is exactly its visible mask."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([(xx / 4) % 256, (yy / 3) % 256, ((xx + yy) / 5) % 256], -1)
    pixels = pixels + rng.integers(0, 40, pixels.shape)
    # Polygons in (x, y) pixel coordinates, COCO style (flat lists).
    circle = [(300 + 150 * np.cos(t), 300 + 150 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    rectangle = [(600, 120), (920, 120), (920, 380), (600, 380)]
    triangle = [(200, 900), (520, 560), (700, 940)]
    polygons = [circle, rectangle, triangle]
    classes = [i % num_classes for i in range(len(polygons))]
    colors = [(230, 40, 40), (40, 200, 60), (50, 60, 220)]
    from PIL import Image, ImageDraw

    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for poly, color in zip(polygons, colors):
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=color)
    flat = [[float(v) for xy in poly for v in xy] for poly in polygons]
    return np.asarray(img), flat, classes


def detectron2_worker(args):
    """Runs in its own process: builds detectron2's model and optimizer, trains, prints JSON."""
    before_import = proc_status()["VmRSS"]
    d2 = os.path.abspath(args.detectron2)
    link = os.path.join(d2, "detectron2", "model_zoo", "configs")
    if not os.path.exists(link):
        os.symlink(os.path.join(d2, "configs"), link)
    sys.path.insert(0, d2)
    import numpy as np
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    libraries_rss = proc_status()["VmRSS"]

    cfg = LazyConfig.load(os.path.join(d2, "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"))
    cfg.model.roi_heads.num_classes = args.num_classes
    model = instantiate(cfg.model)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)

    pixels, polygons, classes = synthetic_instances(args.size, args.num_classes)
    h, w = pixels.shape[:2]
    inst = Instances((h, w))
    masks = PolygonMasks([[np.asarray(p, dtype=np.float64)] for p in polygons])
    if args.mask_format == "bitmask":
        from detectron2.structures.masks import polygons_to_bitmask

        masks = BitMasks(torch.stack([torch.from_numpy(polygons_to_bitmask([np.asarray(p)], h, w)) for p in polygons]))
    inst.gt_masks = masks
    inst.gt_boxes = masks.get_bounding_boxes()  # as the LSJ mapper's recompute_boxes
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    batch = [{"image": torch.as_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1))), "height": h, "width": w,
              "instances": inst}]
    ready_rss = proc_status()["VmRSS"]

    seconds, cpu_seconds, losses, fg = [], [], [], []
    with EventStorage(0) as storage:
        for i in range(args.warmup + args.runs):
            storage.iter = i
            t, c = time.perf_counter(), time.process_time()
            loss_dict = model(batch)
            total = sum(loss_dict.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - t)
            cpu_seconds.append(time.process_time() - c)
            losses.append({k: float(v) for k, v in loss_dict.items()} | {"loss": float(total)})
            fg.append(storage.latest()["roi_head/num_fg_samples"][0])
            storage.step()
    print(json.dumps({
        "framework": "detectron2",
        "torch": torch.__version__,
        "threads": args.threads,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "losses": losses,
        "fg_rois": fg,
        "rss_before_import_bytes": before_import,
        "rss_libraries_bytes": libraries_rss,
        "rss_model_ready_bytes": ready_rss,
        "peak_rss_self_bytes": proc_status()["VmHWM"],
    }))


def process_cpu_seconds(pid):
    """User + system CPU seconds a running process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_load():
    """The 1-minute load average: other work on the machine slows both frameworks."""
    return os.getloadavg()[0]


def process_facts(usage, started):
    """CPU and wall seconds of a finished child: CPU / wall far below the thread count means it
    waited for cores (or ran single-threaded code)."""
    return {"process_cpu_seconds": usage.ru_utime + usage.ru_stime, "process_wall_seconds": time.time() - started,
            "load_end": machine_load()}


def wait_rusage(proc):
    """Waits for a Popen child; returns (exit status, its peak RSS in bytes from wait4, rusage)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, usage  # Linux reports ru_maxrss in kilobytes


def run_detectron2(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "detectron2", "--detectron2", args.detectron2,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs),
           "--num-classes", str(args.num_classes), "--mask-format", args.mask_format, "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_start, started = machine_load(), time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        code, peak, usage = wait_rusage(proc)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        return {"framework": "detectron2", "error": f"exit status {code}: {stderr.strip()[-3000:]}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = peak
    result["load_start"] = load_start
    result.update(process_facts(usage, started))
    return result


def run_vitdet(args):
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        return {"framework": "vitdet", "error": f"no executable {binary}: run `cargo build --release` first"}
    iters = args.warmup + args.runs
    work = tempfile.mkdtemp(prefix="vitdet-train-bench-")
    try:
        data, run = os.path.join(work, "data"), os.path.join(work, "run")
        synth = [binary, "data", "synth", "--out", data, "--train", "4", "--val", "1", "--size", str(args.size),
                 "--seed", str(args.seed)]
        r = subprocess.run(synth, capture_output=True, text=True)
        if r.returncode != 0:
            return {"framework": "vitdet", "command": " ".join(synth),
                    "error": f"exit status {r.returncode}: {(r.stderr or r.stdout).strip()[-3000:]}"}
        cmd = [binary, "--threads", str(args.threads), "train", "--model", "vitdet-b", "--data", data, "--out", run,
               "--iters", str(iters), "--batch", "1", "--seed", str(args.seed),
               "--checkpoint-every", str(iters + 1000)]
        metrics_path = os.path.join(run, "metrics.jsonl")
        load_start, started = machine_load(), time.time()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            peak_iterations = None
            cpu_at_line = []  # the process's CPU seconds when each metrics line was first seen
            # Poll until the last iteration's line is written: the high-water mark then is the
            # peak of the iterations (plus at most one polling interval of the checkpoint write).
            # wait4 with WNOHANG reaps the child when it ends, keeping its rusage.
            while True:
                hwm = proc_status(proc.pid).get("VmHWM")
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024  # kilobytes
                    proc.returncode = code
                    break
                if peak_iterations is None and hwm is not None and os.path.exists(metrics_path):
                    with open(metrics_path) as f:
                        done = sum(1 for l in f if l.strip())
                    if done > len(cpu_at_line):
                        cpu_at_line += [process_cpu_seconds(proc.pid)] * (done - len(cpu_at_line))
                    if done >= iters:
                        peak_iterations = hwm
                time.sleep(0.05)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if code != 0:
            return {"framework": "vitdet", "command": " ".join(cmd),
                    "error": f"exit status {code}: {(stderr or stdout).strip()[-3000:]}"}
        with open(metrics_path) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        return {
            "framework": "vitdet",
            "command": " ".join(cmd),
            "threads": args.threads,
            "seconds": [l["seconds"] for l in lines],
            # From the second iteration on (the first also compiles and initializes), to within
            # the 50 ms polling interval; None where two lines appeared within one poll.
            "cpu_seconds": [None] + [b - a if b != a else None for a, b in zip(cpu_at_line, cpu_at_line[1:])],
            "losses": [l["losses"] for l in lines],
            "fg_rois": [l.get("samples", {}).get("roi_head/num_fg_samples") for l in lines],
            "peak_rss_bytes": peak,
            "peak_rss_iterations_bytes": peak_iterations,
            "load_start": load_start,
            **process_facts(usage, started),
            "stderr": stderr.strip()[-2000:],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def median_timed(result, warmup, key="seconds"):
    """Median of the iterations after the warm-up (None when none was measured)."""
    timed = [v for v in result[key][warmup:] if v is not None]
    return statistics.median(timed) if timed else None


def fmt(value, width, digits=1):
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectron2", help="detectron2 source checkout (needed unless --skip-detectron2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--runs", type=int, default=3, help="timed iterations (the median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-classes", type=int, default=4, help="detectron2's class count (vitdet's: the dataset's)")
    ap.add_argument("--mask-format", choices=["polygon", "bitmask"], default="polygon")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "vitdet"))
    ap.add_argument("--save", help="write every measurement to this JSON file")
    ap.add_argument("--skip-vitdet", action="store_true")
    ap.add_argument("--skip-detectron2", action="store_true")
    ap.add_argument("--worker", choices=["detectron2"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = 1024  # ViTDet-B's input; both configs are built for it
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1, --warmup at least 0")
    if args.skip_detectron2 and args.skip_vitdet:
        ap.error("--skip-detectron2 and --skip-vitdet leave nothing to run")
    if not args.skip_detectron2:
        if not args.detectron2:
            ap.error("--detectron2 CHECKOUT is required (or pass --skip-detectron2)")
        config = os.path.join(args.detectron2, "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py")
        if not os.path.isfile(config):
            ap.error(f"{args.detectron2} is not a detectron2 source checkout: {config} does not exist")
    if args.worker == "detectron2":
        detectron2_worker(args)
        return

    results = {}
    if not args.skip_detectron2:
        print(f"detectron2: {args.warmup} + {args.runs} iterations ...", file=sys.stderr, flush=True)
        results["detectron2"] = run_detectron2(args)
    if not args.skip_vitdet:
        print(f"vitdet: {args.warmup} + {args.runs} iterations ...", file=sys.stderr, flush=True)
        results["vitdet"] = run_vitdet(args)

    print(f"\nViTDet-B Mask R-CNN training, batch 1 at {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.runs} iterations after {args.warmup} warm-up")
    print(f"{'framework':<12} {'s/iter':>8} {'CPU s/iter':>11} {'peak RSS GiB':>13}  notes")
    med = {}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} {'-':>8} {'-':>11} {'-':>13}  FAILED: {r['error']}")
            continue
        med[name] = median_timed(r, args.warmup)
        r["median_seconds"] = med[name]
        r["median_cpu_seconds"] = median_timed(r, max(args.warmup, 1 if name == "vitdet" else 0), "cpu_seconds")
        if name == "detectron2":
            note = (f"torch {r['torch']}; {r['rss_libraries_bytes'] / GIB:.2f} GiB after imports, "
                    f"{r['rss_model_ready_bytes'] / GIB:.2f} GiB with model and batch; fg RoIs {r['fg_rois']}")
        else:
            p = r["peak_rss_iterations_bytes"]
            note = ("peak by the last iteration " + (f"{p / GIB:.2f} GiB" if p else "not sampled")
                    + f" (the rest: final checkpoint write); fg RoIs {r['fg_rois']}")
        print(f"{name:<12} {med[name]:>8.1f} {fmt(r['median_cpu_seconds'], 11)} "
              f"{r['peak_rss_bytes'] / GIB:>13.2f}  {note}")
        print(f"{'':<12} per iteration: " + ", ".join(f"{s:.1f}" for s in r["seconds"])
              + f"; last loss {r['losses'][-1].get('loss', float('nan')):.3f}; process CPU/wall "
              f"{r['process_cpu_seconds'] / r['process_wall_seconds']:.2f}; "
              f"load average {r['load_start']:.1f} at start, {r['load_end']:.1f} at end")
    if "vitdet" in med and "detectron2" in med:
        ratio_t = med["vitdet"] / med["detectron2"]
        ratio_m = results["vitdet"]["peak_rss_bytes"] / results["detectron2"]["peak_rss_bytes"]
        results["ratio"] = {"seconds": ratio_t, "peak_rss": ratio_m}
        print(f"vitdet / detectron2: time {ratio_t:.2f}x, peak RSS {ratio_m:.2f}x")
    if args.save:
        from_dir = os.path.dirname(os.path.abspath(args.save))
        fd, tmp = tempfile.mkstemp(dir=from_dir, prefix=".train_compare.")
        with os.fdopen(fd, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}, f,
                      indent=2)
        os.replace(tmp, args.save)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
