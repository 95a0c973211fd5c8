"""
CG-LoRA's initialization cost: the memory-bounded sketch mode against the dense gradient-SVD
initialization.

    python benchmarks/bench_cg.py       # SmolLM2-135M, all 7 linears, r = 8, 8 batches of 4 x 128

Setups (same calibration batches, same model, alternated, medians over --rounds):
    dense identity   G = ∂L/∂W per layer kept in fp32, then a full SVD each, top r kept (the
                     LoRA-GA / LoRA-One family's gradient-SVD initialization: CG-LoRA's own
                     identity-curvature ablation)
    dense randomized the same G, top-r by a randomized SVD with 4r columns and 4 power iterations
                     (what LoRA-GA's code computes, torch.svd_lowrank(q=4r, niter=4)): the same
                     gradients, a much cheaper SVD
    sketch kfac-diag one pass; per layer a diagonal-whitened randomized sketch,
                     O((d_in + d_out)·r) memory
All three run CG-LoRA's calibrate() with the predicted η (the measured-KL step size adds a few
forwards to every setup alike and is timed separately by train.py's cg_init_s). Reported: wall
time of the calibration and the bytes of calibration statistics it holds (G or sketches +
factors, counted from tensor sizes). The paper reports 0.51× time and 0.39× memory against
LoRA-GA on RoBERTa-base; the goal here is at least as good a ratio. Not a test: prints figures.
"""

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters as A  # noqa: E402
import model as M  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint folder or name")
    ap.add_argument("--batches", type=int, default=8, help="calibration batches")
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (all carry labels)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per setup")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = M.load_pretrained(args.model, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        batches.append((ids, labels))
    setups = {"dense identity": dict(cg_mode="dense", cg_curvature="identity"),
              "dense randomized": dict(cg_mode="dense", cg_curvature="identity",
                                       cg_dense_svd="randomized"),
              "sketch kfac-diag": dict(cg_mode="sketch", cg_curvature="kfac-diag")}
    results = {k: [] for k in setups}
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.model}, "
          f"{args.batches} x {args.batch} x {args.seq} tokens, r = {args.rank}")
    for _ in range(args.rounds):
        for name, opts in setups.items():                      # alternate
            net = copy.deepcopy(base)
            cfg = A.AdapterConfig(method="cg", r=args.rank, targets=A.LLAMA_LINEAR_NAMES,
                                  cg_batches=args.batches, cg_kappa_source="predicted", **opts)
            A.apply_method(net, "cg", cfg)
            with contextlib.redirect_stderr(io.StringIO()):
                info = A.training_hooks(net, cfg).calibrate(batches)
            results[name].append(info)
            del net
    print(f"{'setup':18s} {'init s (median)':>16s} {'statistics MiB':>15s}  (rounds: init s)")
    med = {}
    for name, infos in results.items():
        med[name] = (statistics.median(i["cg_init_s"] for i in infos), infos[0]["cg_extra_mb"])
        rounds = ", ".join(f"{i['cg_init_s']:.2f}" for i in infos)
        print(f"{name:18s} {med[name][0]:16.2f} {med[name][1]:15.1f}  ({rounds})")
    for dense in ("dense identity", "dense randomized"):
        t_ratio = med["sketch kfac-diag"][0] / med[dense][0]
        m_ratio = med["sketch kfac-diag"][1] / med[dense][1]
        print(f"sketch / {dense}: time {t_ratio:.2f}x, memory {m_ratio:.3f}x "
              f"(paper vs LoRA-GA: 0.51x, 0.39x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
