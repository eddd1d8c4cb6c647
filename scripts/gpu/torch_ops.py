#!/usr/bin/env python3
"""Times the ops of `vitdet bench --ops` in PyTorch on the same device, as the baseline.

The op list (names, IR attributes, input shapes) comes from `vitdet bench --ops --list
--format json`, so both sides time the same shapes. Every op runs as PyTorch users would write
it: F.linear, F.conv2d, F.conv_transpose2d, torch.nn.grad.conv2d_weight, torch.softmax,
F.layer_norm, torch.topk, broadcasting `+`, `permute(...).contiguous()`, torch.matmul, and the windowed attention as detectron2 computes it (pad, window partition, the decomposed
relative-position term) with scaled_dot_product_attention taking that term as a dense bias;
its backward is autograd through the same function. Timing matches vitdet's: warm-up calls,
then each call between two synchronizations, median reported. f32 runs with TF32 off (candle's
f32 matmuls and convolutions do not use TF32).

    python3 scripts/gpu/torch_ops.py --vitdet ./vitdet --dtypes f32,bf16 --out torch.json \\
        --compare ours_f32.json ours_bf16.json

With --compare (vitdet's `bench --ops --format json` reports) it prints the side-by-side table
(ratio = ours / torch). `--torch FILE` reuses a saved torch report instead of timing again.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

DTYPES = ("f32", "bf16", "f16")


def torch_dtype(name):
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def load_list(args):
    if args.list:
        with open(args.list) as f:
            return json.load(f)
    cmd = [args.vitdet, "bench", "--ops", "--list", "--format", "json", "--scale", str(args.scale)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def window_attention(op):
    """detectron2's windowed attention from the fused op's inputs (see vitdet's
    `ir/src/ops/window_attention.rs`): qkv [B, H, W, 3C] of the unpadded tokens, the qkv bias
    (padded tokens' q, k, v), the decomposed tables rh [wh, wh, hd], rw [ww, ww, hd]."""
    import torch
    import torch.nn.functional as F

    heads, (wh, ww), scale, rel = op["heads"], op["window"], op["scale"], op["rel_pos"]
    if rel not in ("decomposed", "none"):
        raise ValueError(f"rel_pos {rel} is not timed here")

    def run(qkv, *rest):
        rest = list(rest)
        bias = rest.pop(0) if op["qkv_bias"] else None
        B, H, W, C3 = qkv.shape
        C = C3 // 3
        hd = C // heads
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        x = qkv
        if (Hp, Wp) != (H, W):
            # detectron2 pads the normed tokens with zeros before the qkv linear: padded
            # tokens' q, k, v are the bias.
            fill = bias if bias is not None else qkv.new_zeros(C3)
            x = F.pad(qkv - fill, (0, 0, 0, Wp - W, 0, Hp - H)) + fill
        nh, nw = Hp // wh, Wp // ww
        x = x.view(B, nh, wh, nw, ww, 3, heads, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = x.reshape(3, B * nh * nw, heads, wh * ww, hd).unbind(0)
        mask = None
        if rel == "decomposed":
            rh, rw = rest
            rq = q.reshape(-1, heads, wh, ww, hd)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(-1, heads, wh * ww, wh * ww)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        o = o.view(B, nh, nw, heads, wh, ww, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, C)
        return o[:, :H, :W, :]

    return run


def forward_arity(op):
    return 1 + int(op["qkv_bias"]) + (2 if op["rel_pos"] == "decomposed" else 0)


def make_call(row, dtype, device):
    """The inputs of a row and a function timing one call on them."""
    import torch
    import torch.nn.functional as F

    op = row["op"]
    kind = op["op"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(spec, grad=False):
        t = torch.randn(spec["shape"], generator=gen) * spec["std"]
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    if kind == "window_attention_grad":
        n = forward_arity(op)
        fwd = window_attention(op)
        xs = [randn(s, grad=True) for s in row["inputs"][:n]]
        out = fwd(*xs)
        dout = randn(row["inputs"][-1])
        # Without padding the bias takes no part (unused).
        return lambda: torch.autograd.grad(out, xs, dout, retain_graph=True, allow_unused=True)

    xs = [randn(s) for s in row["inputs"]]
    if kind == "linear":
        f = lambda: F.linear(*xs)
    elif kind == "window_attention":
        fwd = window_attention(op)
        f = lambda: fwd(*xs)
    elif kind == "softmax":
        f = lambda: torch.softmax(xs[0], dim=op["axis"])
    elif kind == "layer_norm":
        if op["axis"] != len(xs[0].shape) - 1:
            raise ValueError("layer_norm is timed over the last axis only")
        c = xs[0].shape[-1]
        f = lambda: F.layer_norm(xs[0], (c,), xs[1], xs[2], op["eps"])
    elif kind == "conv2d":
        f = lambda: F.conv2d(
            xs[0], xs[1], xs[2] if len(xs) > 2 else None, op["stride"], op["padding"], op["dilation"], op["groups"]
        )
    elif kind == "conv_transpose2d":
        f = lambda: F.conv_transpose2d(
            xs[0],
            xs[1],
            xs[2] if len(xs) > 2 else None,
            op["stride"],
            op["padding"],
            op["output_padding"],
            1,
            op["dilation"],
        )
    elif kind == "conv2d_grad_weight":
        x, dy = xs
        shape = (dy.shape[1], x.shape[1] // op["groups"], *op["kernel"])
        f = lambda: torch.nn.grad.conv2d_weight(
            x, shape, dy, op["stride"], op["padding"], op["dilation"], op["groups"]
        )
    elif kind == "top_k":
        f = lambda: torch.topk(xs[0], op["k"], dim=-1)
    elif kind == "binary":
        binary = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op["kind"]]
        f = lambda: binary(xs[0], xs[1])
    elif kind == "permute":
        f = lambda: xs[0].permute(*op["perm"]).contiguous()
    elif kind == "mat_mul":
        a = xs[0].transpose(-1, -2) if op.get("transpose_lhs") else xs[0]
        b = xs[1].transpose(-1, -2) if op["transpose_rhs"] else xs[1]
        f = lambda: torch.matmul(a, b)
    else:
        raise ValueError(f"no PyTorch version of {kind}")

    def no_grad():
        with torch.no_grad():
            return f()

    return no_grad


def time_call(fn, device, warmup, iters):
    """Median and min ms of `iters` synchronized calls after `warmup`, and the peak bytes the
    calls allocated above what was allocated before them (CUDA only)."""
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        ms.append((time.perf_counter() - start) * 1e3)
        del out
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return statistics.median(ms), min(ms), peak


def run_torch(op_list, dtypes, device, warmup, iters):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for dname in dtypes:
        for row in op_list["ops"]:
            print(f"torch {dname} {row['name']}", file=sys.stderr, flush=True)
            out = {"name": row["name"], "dtype": dname, "shape": row["shape"]}
            try:
                fn = make_call(row, torch_dtype(dname), device)
                out["median_ms"], out["min_ms"], out["peak_bytes"] = time_call(fn, device, warmup, iters)
            except Exception as e:  # one failing op must not lose the others
                out["error"] = f"{type(e).__name__}: {e}"
            rows.append(out)
            fn = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "tf32": False,
        "warmup": warmup,
        "iters": iters,
        "ops": rows,
    }


def mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def compare_table(ours_reports, torch_report):
    """Side-by-side rows of vitdet's reports and the torch report, as text."""
    theirs = {(r["name"], r["dtype"]): r for r in torch_report["ops"]}
    lines = [
        f"{'op':<24} {'dtype':<5} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'ours MiB':>9} {'torch MiB':>9}"
    ]
    for report in ours_reports:
        for r in report["ops"]:
            t = theirs.get((r["name"], r["dtype"]), {})
            ours_ms, torch_ms = r.get("median_ms"), t.get("median_ms")
            ratio = f"{ours_ms / torch_ms:.2f}" if ours_ms and torch_ms else "-"
            # "fail": the row ran and failed; "-": no such row.
            fmt = lambda row, v: f"{v:.3f}" if v is not None else ("fail" if "error" in row else "-")
            lines.append(
                f"{r['name']:<24} {r['dtype']:<5} {fmt(r, ours_ms):>9} {fmt(t, torch_ms):>9} {ratio:>6} "
                f"{mib(r.get('peak_bytes')):>9} {mib(t.get('peak_bytes')):>9}"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--list", help="op list JSON (vitdet bench --ops --list --format json)")
    src.add_argument("--vitdet", default="vitdet", help="vitdet binary to ask for the op list")
    src.add_argument("--torch", help="an earlier torch report to compare instead of timing")
    p.add_argument("--scale", type=int, default=1, help="with --vitdet: divide every size by this")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="write the torch report (JSON) here")
    p.add_argument("--compare", nargs="*", default=[], help="vitdet bench --ops JSON reports")
    args = p.parse_args()

    if args.torch:
        with open(args.torch) as f:
            report = json.load(f)
    else:
        dtypes = [d for d in args.dtypes.split(",") if d]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            p.error(f"unknown dtypes {bad}: expected {DTYPES}")
        report = run_torch(load_list(args), dtypes, args.device, args.warmup, args.iters)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        failed = [f"{r['name']} {r['dtype']}" for r in report["ops"] if "error" in r]
        for r in report["ops"]:
            if "error" in r:
                print(f"torch {r['name']} {r['dtype']}: {r['error']}", file=sys.stderr)
    ours = []
    for path in args.compare:
        with open(path) as f:
            ours.append(json.load(f))
    if ours:
        print(compare_table(ours, report))
    elif not args.torch:
        for r in report["ops"]:
            ms = f"{r['median_ms']:.3f} ms" if "median_ms" in r else "failed"
            print(f"{r['name']:<24} {r['dtype']:<5} {ms}")
    if not args.torch and failed:
        sys.exit(f"{len(failed)} torch ops failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
