"""
CTR-LoRA's cost: step time relative to LoRA on SmolLM2-135M, and the bytes of curvature state per
module.

    python benchmarks/bench_ctr.py   # SmolLM2-135M, batch 4 x 128 tokens, 5 rounds, 2 threads
    python benchmarks/bench_ctr.py --metric kfac-full --rounds 3

One step is exactly what train.py does per optimizer step, hooks included: before_micro_batch,
forward with the LM loss, backward, regularizer, clip, before_optimizer_step (statistics folded
into the EMA, snapshot), AdamW step, after_optimizer_step (trust region, allocator), zero_grad.
LoRA (rank 8) and CTR-LoRA (r₀ 12 → budget 8, allocating every 10 steps as by default) run
alternately after one warm-up step each, on the same batch and threads; medians are printed. The
state sizes are computed from shapes (adapters.curvature_state_bytes, which tests/test_ctr.py
checks against the tensors a run actually holds). Not a test: prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapter_config as AC  # noqa: E402
import adapters as A  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402


def make(base, method: str, metric: str, rounds: int):
    net = copy.deepcopy(base)
    opts = dict(method=method, r=8, alpha=16.0, targets=A.LLAMA_LINEAR_NAMES,
                total_steps=rounds + 1)
    if method == "ctr":
        opts.update(init_rank=12, target_rank=8, t_init=0, t_final=0, delta_t=10, ctr_metric=metric)
    cfg = A.AdapterConfig(**opts)
    A.apply_method(net, method, cfg)
    hooks = A.training_hooks(net, cfg)
    params = A.optimizer_parameters(net)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    net.train()
    state = {"t": 0}

    def step(batch):
        n_label = int((batch["labels"] != -100).sum())
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            # (includes the regularizer)
            T.accumulate_gradients(net, [batch], n_label, "cpu", method=hooks)
            T.optimizer_step(opt, params, hooks, state["t"], clip=1.0)
        state["t"] += 1
        return time.perf_counter() - t0
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--model", default="smollm2-135m",
                    help="checkpoint folder or name under checkpoints/")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128,
                    help="tokens per sequence (the last quarter carries labels)")
    ap.add_argument("--rounds", type=int, default=5, help="measured steps per setup")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--metric", default="kfac-diag", choices=AC.CTR_METRICS,
                    help="CTR-LoRA's curvature proxy")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = M.load_pretrained(args.model, torch.float32, "cpu")
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    labels = ids.roll(-1, 1)
    labels[:, : args.seq * 3 // 4] = -100        # prompt/completion-like: a quarter carries loss
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels}
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.model}, "
          f"batch {args.batch} x {args.seq}, {args.threads} threads, ctr metric {args.metric}")
    setups = {"lora": make(base, "lora", args.metric, args.rounds),
              "ctr": make(base, "ctr", args.metric, args.rounds)}
    times = {k: [] for k in setups}
    for k, step in setups.items():
        step(batch)                                            # warm-up
    for _ in range(args.rounds):
        for k, step in setups.items():                         # alternate: A B A B ...
            times[k].append(step(batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'setup':8s} {'median s/step':>14s} {'min s/step':>11s}")
    for k in setups:
        print(f"{k:8s} {med[k]:14.3f} {min(times[k]):11.3f}")
    print(f"CTR-LoRA / LoRA step time: {med['ctr'] / med['lora']:.3f} (goal <= 1.25)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    print("\ncurvature state per module (fp32 bytes, from shapes; r0 = 12):")
    shapes = {"smollm2-135m": M.preset_config("smollm2-135m"),
              "llama2-7b": M.preset_config("llama2-7b")}
    for name, cfg in shapes.items():
        C, I, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
        mods = {"q_proj/o_proj": (C, C), "k_proj/v_proj": (C, kv), "gate/up_proj": (C, I),
                "down_proj": (I, C)}
        for mod, (d_in, d_out) in mods.items():
            row = {m: A.curvature_state_bytes(d_in, d_out, 12, m) for m in AC.CTR_METRICS}
            print(f"  {name:13s} {mod:14s} d_in {d_in:6d} d_out {d_out:6d}: "
                  f"kfac-diag {row['kfac-diag']:>12,} B  "
                  f"kfac-full {row['kfac-full']:>15,} B  hessian {row['hessian']:>12,} B")


if __name__ == "__main__":
    main()
