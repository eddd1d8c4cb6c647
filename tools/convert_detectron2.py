#!/usr/bin/env python3
"""Convert a detectron2 checkpoint (.pkl from the model zoo, or .pth from training) into a
safetensors file vitdet loads, keys unchanged.

    python3 tools/convert_detectron2.py model_final_61ccd1.pkl vitdet_b.safetensors
    python3 tools/convert_detectron2.py model_final.pth vitdet_b.safetensors --prefix backbone.

Needs numpy and safetensors; a .pth additionally needs torch. Tensors are written as float32
(int64 counters such as BatchNorm's num_batches_tracked are kept as int64); the output is
written to a temporary file and renamed, so a failed run never leaves a partial file.
"""
import argparse
import os
import pickle
import sys

import numpy as np
from safetensors.numpy import save_file


def load_state_dict(path):
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        import torch
        data = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    if not isinstance(data, dict):
        sys.exit(f"{path}: expected a state dict (or a dict with a 'model' entry), found {type(data).__name__}")
    out = {}
    for k, v in data.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if v.dtype.kind == "f":
            v = v.astype(np.float32)
        elif v.dtype.kind in "iu":
            v = v.astype(np.int64)
        else:
            sys.exit(f"{path}: key {k!r} has unsupported dtype {v.dtype}")
        out[k] = np.ascontiguousarray(v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("output")
    ap.add_argument("--prefix", default="", help="keep only keys starting with this (e.g. 'backbone.')")
    args = ap.parse_args()
    sd = load_state_dict(args.checkpoint)
    sd = {k: v for k, v in sd.items() if k.startswith(args.prefix)}
    if not sd:
        sys.exit(f"{args.checkpoint}: no keys start with {args.prefix!r}")
    tmp = args.output + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(sd)} tensors, {sum(v.size for v in sd.values()):,} elements")


if __name__ == "__main__":
    main()
