"""
What CTR-LoRA's trust region does to real steps, measured from outside the method.

    python benchmarks/ctr_trust_region.py           # SmolLM2, lr 1e-2 and 1e-1, 50 steps
    python benchmarks/ctr_trust_region.py --model TINY --runs lora adalora ctr ctr-no-tr \
        --lrs 0.01 0.3 1 --steps 25 --batch-size 4 --rank 4 --targets q_proj,v_proj,down_proj \
        --warmup-steps 0 --clip 0        # notes/ctr_lora.md's stability table (TINY: its script 1)

Runs train.py's step functions (accumulate_gradients, optimizer_step) on the demo data for CTR-LoRA
with and without its trust region (runs "ctr" and "ctr-no-tr"; also "lora" and "adalora" as
controls; every other setting train.py's default unless given) and, after every step, measures the
KL the applied step caused on its own batch: the mean over its label tokens of
KL(p_before ‖ p_after), from two no-grad forwards in float64 that do not involve the method.
Prints, per run, the fraction of steps the trust region clipped (shrink < 1), the largest and
median measured per-step KL, and the training loss at the start, its peak and at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import adapters as A  # noqa: E402
import data as D  # noqa: E402
import train as T  # noqa: E402
from convert_gguf import ensure_default_model  # noqa: E402


@torch.no_grad()
def label_log_probs(net, ids, labels) -> torch.Tensor:
    net.eval()
    out = torch.log_softmax(net.label_logits(ids, labels != -100).double(), -1)
    net.train()
    return out


RUNS = {"ctr": ("ctr", {}), "ctr-no-tr": ("ctr", {"ctr_trust_region": False}),
        "lora": ("lora", {}), "adalora": ("adalora", {})}


def run(model_dir, name: str, lr: float, steps: int, args) -> dict:
    method, options = RUNS[name]
    cfg = T.TrainConfig(model=str(model_dir), method=method, lr=lr, steps=steps, seed=args.seed,
                        batch_size=args.batch_size, rank=args.rank, targets=args.targets,
                        warmup_steps=args.warmup_steps, clip=args.clip, method_options=options)
    trust_region = method == "ctr" and options.get("ctr_trust_region", True)
    batch_size, seed = args.batch_size, args.seed
    net, tok = T.build_model(cfg, torch.device("cpu"))
    acfg = cfg.adapter_config()
    hooks = A.training_hooks(net, acfg)
    params = A.optimizer_parameters(net)
    opt = torch.optim.AdamW([{"params": params, "start_step": 0}], lr=lr, fused=True)
    examples = D.encode_dataset(D.load_jsonl(cfg.data), tok, cfg.seq_len)
    batcher = D.Batcher(examples, batch_size, tok.pad_id, seed=seed)
    kls, losses, shrinks = [], [], []
    net.train()
    for step in range(steps):
        b = next(batcher)
        ids, labels = b["input_ids"], b["labels"]
        before = label_log_probs(net, ids, labels)
        T.set_lrs(opt, step, cfg)
        losses.append(T.accumulate_gradients(net, [b], D.count_label_tokens(b), "cpu",
                                             method=hooks))
        T.optimizer_step(opt, params, hooks, step, cfg.clip)
        after = label_log_probs(net, ids, labels)
        kls.append(float((before.exp() * (before - after)).sum(-1).mean()))
        shrinks.append(hooks._log["shrink"] if trust_region else 1.0)
    hooks.close()
    return {"kl": kls, "loss": losses, "shrink": shrinks}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--model", default="", help="checkpoint folder (default: the embedded SmolLM2)")
    ap.add_argument("--runs", nargs="+", default=["ctr", "ctr-no-tr"], choices=list(RUNS))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-1])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default=",".join(A.LLAMA_LINEAR_NAMES))
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or ensure_default_model()
    rho = A.AdapterConfig().ctr_rho
    print("| lr | run | steps clipped | largest KL | median KL | loss start / peak / end |")
    print("|---|---|---|---|---|---|")
    for lr in args.lrs:
        for name in args.runs:
            t0 = time.perf_counter()
            r = run(model_dir, name, lr, args.steps, args)
            clipped = sum(s < 1.0 for s in r["shrink"]) / len(r["shrink"])
            label = f"ctr (ρ = {rho:g})" if name == "ctr" else name
            print(f"| {lr:g} | {label} | {clipped:.0%} | "
                  f"{max(r['kl']):.3g} | {statistics.median(r['kl']):.3g} | "
                  f"{r['loss'][0]:.3f} / {max(r['loss']):.3f} / {r['loss'][-1]:.3f} |", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
