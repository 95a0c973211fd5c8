"""
Write an HF-format checkpoint of a preset's shape with random weights: real-size loading, memory
and speed tests without downloading anything (synthetic_checkpoint.write_synthetic_checkpoint does
the work).

    python scripts/make_synthetic_checkpoint.py llama2-7b checkpoints/synthetic-llama2-7b
                                                                           # 13.5 GB, bf16
    python scripts/make_synthetic_checkpoint.py llama2-13b /tmp/l13 --layers 2 --shard-size 600MB
                                                                           # 1.9 GB

The folder holds config.json, model-0000i-of-0000n.safetensors + model.safetensors.index.json (or
one model.safetensors), a tokenizer (a 246-token byte-level BPE, or a copy of --tokenizer-from
when its vocabulary fits) and SYNTHETIC.txt. Load it like any checkpoint:
`python model.py --model FOLDER --dtype bfloat16 --no-chat`.
"""

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import model as M  # noqa: E402
from synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as HF's max_shard_size), '512MiB' -> 536_870_912,
    '1000' -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 2GB, 500MB or 512MiB")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").upper()])


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Write a synthetic (random-weight) HF checkpoint of a preset's shape.",
        epilog=f"presets: {', '.join(M.PRESETS)}")
    ap.add_argument("preset", help="shape to write, e.g. llama2-7b, llama2-13b, llama3-8b, "
                                   "smollm2-135m, tiny")
    ap.add_argument("out", type=Path, help="folder to create (must not exist, unless --overwrite)")
    ap.add_argument("--layers", type=int, default=None,
                    help="number of layers (default: the preset's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="dtype of the stored weights (default: bfloat16)")
    ap.add_argument("--shard-size", type=parse_size, default="2GB",
                    help="largest shard, e.g. 2GB (default), 500MB, 1GiB; GB = 10^9 bytes as in HF")
    ap.add_argument("--seed", type=int, default=0,
                    help="weights are a function of (seed, tensor name)")
    ap.add_argument("--tokenizer-from", default=None,
                    help="copy this checkpoint's tokenizer (its vocabulary must fit the preset's "
                         "vocab_size); default: a small byte-level BPE tokenizer")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = ap.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    t0 = time.perf_counter()
    out = write_synthetic_checkpoint(args.out, args.preset, num_layers=args.layers,
                                     dtype=getattr(torch, args.dtype), shard_bytes=args.shard_size,
                                     seed=args.seed, tokenizer_from=args.tokenizer_from,
                                     overwrite=args.overwrite)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {out}: {len(files)} safetensors file(s), {size / 1e9:.2f} GB, "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    M.cli(main)
