"""
Step time of TriAdaptLoRA and AdaLoRA relative to LoRA at the same final budget, ours and peft's,
side by side.

    python benchmarks/bench_methods.py          # SmolLM2-135M, batch 4 x 128 tokens, 5 rounds
    python benchmarks/bench_methods.py --batch 2 --seq 64 --rounds 3 --threads 2

Setups (SmolLM2-135M from checkpoints/smollm2-135m, fp32, CPU, all 7 linears, α = 16, final
budget rank 8 per module):

    ours lora       r = 8 (model.load_pretrained + adapters.apply_method)
    ours adalora    r₀ = 12 -> target 8: shapes stay at r₀, plus scores and a masking step every
                    step (ΔT = 1)
    ours triadapt   grown to r_ref = 8 everywhere (its end-of-run structure: a block of 4 + four
                    blocks of 1)
    peft lora       r = 8 (transformers LlamaForCausalLM + peft)
    peft adalora    init_r 12, target_r 8, update_and_allocate every step (deltaT = 1),
                    orth_reg_weight 0.1

One step = forward with the LM loss (+ orthogonality penalty), backward, AdamW step, the method's
allocator hook, zero_grad — the work train.py does per optimizer step. Setups run round-robin
(A B C D E A B C D E ...) after one warm-up step each, on the same token batch and thread count;
the table shows medians. Ratios are within one implementation (ours vs ours, peft vs peft): our
model computes the LM head only where labels exist, transformers on every position, so absolute
times are not comparable across the two. Not a test: prints figures. The machine may be shared:
the load average is printed before and after.
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
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters as A  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402

ALL_LINEARS = A.LLAMA_LINEAR_NAMES


class Setup:
    """A model, its optimizer and one `step()`; `impl` is "ours" or "peft"."""

    # --fused: AdamW(fused=True), one kernel over all tensors, as train.py uses on CPU and CUDA
    fused = False

    def __init__(self, name, impl, net, step_fn, params):
        self.name, self.impl, self.net, self.step_fn = name, impl, net, step_fn
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=self.fused or None)
        self.n_trainable = sum(p.numel() for p in params)
        self.times: list[float] = []
        self.t = 0

    def step(self, ids):
        start = time.perf_counter()
        # one allocation line per step would flood the table
        with contextlib.redirect_stderr(io.StringIO()):
            self.step_fn(self, ids)
        self.t += 1
        return time.perf_counter() - start


def ours(base, method: str, rank: int, total_steps: int) -> Setup:
    net = copy.deepcopy(base)
    options = dict(method=method, r=rank, alpha=16.0, targets=ALL_LINEARS, total_steps=total_steps,
                   orth_reg=0.1)
    if method == "adalora":
        options.update(init_rank=12, target_rank=rank, t_init=0, t_final=0,
                       delta_t=1)  # allocate every step
    if method == "triadapt":
        options.update(tri_init_rank=4, tri_block=1, tri_warmup=total_steps - 1, tri_interval=1,
                       tri_final=total_steps)  # no growth during the measurement
    cfg = A.AdapterConfig(**options)
    A.apply_method(net, method, cfg)
    if method == "triadapt":
        for layer in A.adapter_layers(net).values():
            layer.grow_to(rank)
    hooks = A.training_hooks(net, cfg)
    net.train()

    def step(s: Setup, ids):
        loss = net(ids, labels=ids)
        reg = hooks.regularizer()
        (loss + reg if reg is not None else loss).backward()
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        # train.py's hooks around AdamW; no clipping
        T.optimizer_step(s.optimizer, params, hooks, s.t, clip=0.0)

    return Setup(f"ours {method}", "ours", net, step, A.optimizer_parameters(net))


def peft_setup(hf_base, method: str, rank: int, total_steps: int) -> Setup:
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "lora":
            config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=ALL_LINEARS,
                                     task_type="CAUSAL_LM")
        else:
            config = peft.AdaLoraConfig(init_r=12, target_r=rank, lora_alpha=16, tinit=0, tfinal=0,
                                        deltaT=1, total_step=total_steps, orth_reg_weight=0.1,
                                        target_modules=ALL_LINEARS, task_type="CAUSAL_LM")
        net = peft.get_peft_model(copy.deepcopy(hf_base), config)
    net.train()

    def step(s: Setup, ids):
        # peft adds AdaLoRA's penalty to .loss itself
        net(input_ids=ids, labels=ids).loss.backward()
        s.optimizer.step()
        if method == "adalora":
            net.base_model.update_and_allocate(s.t + 1)
        s.optimizer.zero_grad(set_to_none=True)

    return Setup(f"peft {method}", "peft", net, step,
                 [p for p in net.parameters() if p.requires_grad])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--model", default="smollm2-135m",
                    help="checkpoint folder or name under checkpoints/")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--rounds", type=int, default=5, help="measured steps per setup (round-robin)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (same for every setup)")
    ap.add_argument("--rank", type=int, default=8, help="final rank budget per module")
    ap.add_argument("--fused", action="store_true",
                    help="fused AdamW for every setup, as train.py uses (default: torch's "
                         "default AdamW); matters for TriAdaptLoRA's many small tensors")
    args = ap.parse_args(argv)
    Setup.fused = args.fused
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    path = M.resolve_checkpoint(args.model)
    base = M.load_pretrained(path, torch.float32, "cpu")
    hf_base = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total_steps = 10_000
    setups = [ours(base, m, args.rank, total_steps) for m in ("lora", "adalora", "triadapt")]
    setups += [peft_setup(hf_base, m, args.rank, total_steps) for m in ("lora", "adalora")]
    del base, hf_base
    ids = torch.randint(0, 49152, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))

    load_before = os.getloadavg()
    print(f"{path.name}: batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
          f"{args.rounds} rounds (round-robin), {'fused' if args.fused else 'default'} AdamW; "
          f"load average before {load_before[0]:.2f}", file=sys.stderr)
    for s in setups:  # warm-up: first step allocates optimizer state and warms caches
        s.step(ids)
    for r in range(args.rounds):
        for s in setups:
            s.times.append(s.step(ids))
        print(f"round {r + 1}/{args.rounds}: "
              + ", ".join(f"{s.name} {s.times[-1]:.2f}s" for s in setups),
              file=sys.stderr)
    load_after = os.getloadavg()

    medians = {s.name: statistics.median(s.times) for s in setups}
    lora_of = {"ours": medians["ours lora"], "peft": medians["peft lora"]}
    print(f"\n{'setup':<15} {'trainable':>10} {'median s/step':>14} {'min':>7} {'max':>7} "
          f"{'tokens/s':>9} {'vs LoRA (same impl)':>20}")
    for s in setups:
        m = medians[s.name]
        print(f"{s.name:<15} {s.n_trainable:>10,} {m:>14.3f} {min(s.times):>7.3f} "
              f"{max(s.times):>7.3f} {args.batch * args.seq / m:>9.0f} "
              f"{m / lora_of[s.impl]:>19.3f}x")
    print(f"\nstep time relative to LoRA at the same final budget (rank {args.rank} per module), "
          f"medians ({'fused' if args.fused else 'default'} AdamW):")
    print(f"  ours TriAdaptLoRA / ours LoRA = {medians['ours triadapt'] / lora_of['ours']:.3f}")
    print(f"  ours AdaLoRA      / ours LoRA = {medians['ours adalora'] / lora_of['ours']:.3f}")
    print(f"  peft AdaLoRA      / peft LoRA = {medians['peft adalora'] / lora_of['peft']:.3f}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs; other jobs may share them)")


if __name__ == "__main__":
    main()
