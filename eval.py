"""
Evaluate a base model and, side by side, the same model with an adapter (or a fully fine-tuned
checkpoint).

    python eval.py --adapter runs/demo --data data/wordnet_val.jsonl data/wordnet_val_choice.jsonl

The base model, chat setting and weights dtype are the --adapter run's (run_config.json) unless
given. Per data file, by its format (see data.py):
  {"messages"} / {"text"} / {"prompt","completion"} / {"instruction",...}
      ->  loss and perplexity over the target tokens, and for prompt/completion data the exact
          match of greedy generations
  {"question","choices","answer"}
      ->  accuracy by log-likelihood of each choice (summed, and per token)
Results print as a table and are written as JSON (--out, atomically: a failed write leaves the
previous file whole). `--plot-metrics` draws loss curves from runs' metrics.jsonl files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import adapter_io as IO
import data as D
import model as M
import runs
from fileio import unreadable_files, write_json
from tokenizer import load_tokenizer

# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _positions_logprobs(model, input_ids, labels):
    """log p(label) at every labelled position, and the row each belongs to. Head applied only
    where labels exist."""
    h = model.hidden_states(input_ids)                                   # (B, T, C)
    keep = labels != D.IGNORE_INDEX                                       # (B, T)
    logits = model.lm_head(h[keep]).float()                               # (N, vocab)
    logp = logits.log_softmax(-1).gather(-1, labels[keep][:, None])[:, 0] # (N,)
    rows = keep.nonzero()[:, 0]                                           # (N,) row of each label
    return logp, rows


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int) -> dict:
    """Mean cross-entropy per target token over encoded examples, and its perplexity."""
    device = model.inv_freq.device
    total, n = 0.0, 0
    for batch in D.iter_batches(examples, batch_size, pad_id):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        total += model(ids, labels=labels, reduction="sum").item()
        n += D.count_label_tokens(batch)
    loss = total / max(n, 1)
    # (700: avoid float overflow)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": n}


@torch.no_grad()
def choice_accuracy(model, tok, records, max_len: int, chat: bool = False,
                    batch_size: int = 16) -> dict:
    """Pick the choice with the highest log-likelihood given the question. 'acc' sums log-probs
    over the choice's tokens; 'acc_per_token' averages them (less biased towards short
    choices)."""
    device = model.inv_freq.device
    correct = correct_norm = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        encoded = [D.encode_choices(r, tok, max_len, chat) for r in chunk]
        flat = [cand for cands, _ in encoded for cand in cands]
        batch = D.collate(flat, tok.pad_id)
        labels = batch["labels"].to(device)
        logp, rows = _positions_logprobs(model, batch["input_ids"].to(device), labels)
        sums = torch.zeros(len(flat), device=device).index_add_(0, rows, logp)
        counts = (labels != D.IGNORE_INDEX).sum(1).clamp(min=1)
        i = 0
        for cands, answer in encoded:
            k = len(cands)
            correct += int(sums[i:i + k].argmax()) == answer
            correct_norm += int((sums[i:i + k] / counts[i:i + k]).argmax()) == answer
            i += k
    n = len(records)
    return {"acc": correct / n, "acc_per_token": correct_norm / n, "examples": n}


@torch.no_grad()
def exact_match(model, tok, records, chat: bool = False, max_len: int = 256,
                batch_size: int = 16, n_samples: int = 3) -> dict:
    """Fraction of prompts whose greedy continuation is exactly the completion's tokens followed by
    EOS.

    Computed in one teacher-forced pass per batch, which is exact for greedy decoding: the greedy
    output equals target+EOS iff, at every target position, the argmax given the previous target
    tokens is the next target token. (Matching is on tokens: a different tokenization of the same
    text counts as a miss.) A few real generations are kept as samples to look at.
    """
    device = model.inv_freq.device
    examples = D.encode_dataset(records, tok, max_len, chat, name="exact match")
    hits = 0
    for batch in D.iter_batches(examples, batch_size, tok.pad_id):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        h = model.hidden_states(ids)                                  # (B, T, C)
        keep = labels != D.IGNORE_INDEX
        wrong = model.lm_head(h[keep]).argmax(-1) != labels[keep]     # (N,) one per target token
        rows = keep.nonzero()[:, 0]
        misses = torch.zeros(ids.shape[0], device=device).index_add_(0, rows, wrong.float())
        hits += int((misses == 0).sum())
    samples = []
    for r in records[:n_samples]:
        prompt, target = D.render(r, tok, chat)
        out = M.generate(model, tok.encode(prompt, bos=True), len(tok.encode(target)) + 4,
                         eos_id=tok.eos_id)
        samples.append({"prompt": prompt[-60:], "target": target, "generated": tok.decode(out)})
    return {"exact_match": hits / len(examples), "examples": len(examples), "samples": samples}


@torch.no_grad()
def prediction_kl(model, reference, examples, batch_size: int, pad_id: int) -> dict:
    """Prediction alignment (CG-LoRA's target): mean over target tokens of KL(p_reference ‖
    p_model) between the next-token distributions of a reference (e.g. a --method full run) and
    the evaluated model, in nats."""
    device = model.inv_freq.device
    total, n = 0.0, 0
    for batch in D.iter_batches(examples, batch_size, pad_id):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        keep = labels != D.IGNORE_INDEX
        logp = model.label_logits(ids, keep).float().log_softmax(-1)        # (N, vocab)
        logq = reference.label_logits(ids, keep).float().log_softmax(-1)    # (N, vocab)
        total += (logq.exp() * (logq - logp)).sum().item()
        n += int(keep.sum())
    return {"kl_to_reference": total / max(n, 1), "tokens": n}


def evaluate_file(model, tok, path, max_len: int, batch_size: int, chat: bool,
                  max_examples: int | None, generate: bool, reference=None) -> dict:
    records = D.load_jsonl(path)[:max_examples]
    fmt = D.dataset_format(records)
    if fmt == "choice":
        try:
            return choice_accuracy(model, tok, records, max_len, chat, batch_size)
        except D.DataError as e:
            raise D.DataError(f"{path}: {e}") from None
    examples = D.encode_dataset(records, tok, max_len, chat, name=str(path))
    result = evaluate_loss(model, examples, batch_size, tok.pad_id)
    if reference is not None:
        result["kl_to_reference"] = prediction_kl(model, reference, examples, batch_size,
                                                  tok.pad_id)["kl_to_reference"]
    if generate and fmt in ("prompt_completion", "instruction"):
        result.update(exact_match(model, tok, records, chat, max_len, batch_size))
    return result


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, out_png) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    _pyplot().close(fig)
    return out_png


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """One panel of training loss (and validation loss where logged) per step, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, path in runs.items():
        rows = read_metrics(path)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train", alpha=0.8)
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, out_png)


def plot_trust_region(metrics_path: str | Path, out_png: str | Path) -> Path:
    """CTR-LoRA's trust region over a run. Top: the measured KL of the step at each log line
    (`kl`) and the largest since the line before (`kl_max`, where logged) against the bound ρ;
    behind them, faint, the calibrated prediction κ of the proposed step (same units: nats per
    target token). A KL of 0 (no step applied) or an infinite κ is a gap. Bottom: the share of
    steps the trust region shrank (clip rate)."""
    plt = _pyplot()
    rows = [r for r in read_metrics(metrics_path) if "rho" in r]
    if not rows:
        raise ValueError(f"{metrics_path}: no trust-region entries ('kl', 'rho'; only --method "
                         f"ctr logs them)")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True, height_ratios=[2, 1])
    curves = [("kl", dict(color="tab:blue", lw=1.5, label="measured KL of the logged step")),
              ("kl_max", dict(color="tab:orange", lw=1, ls=":",
                              label="largest measured KL since the last log")),
              ("rho", dict(color="black", lw=1.2, ls="--", label="ρ (the bound)")),
              ("kappa", dict(color="0.6", lw=0.8, alpha=0.7, zorder=1,
                             label="κ (calibrated prediction, before the check)"))]
    for key, style in curves:
        points = [(r["step"], r[key] if 0 < r[key] < math.inf else math.nan)
                  for r in rows if key in r]
        if not all(math.isnan(y) for _, y in points):
            ax.plot(*zip(*points), **style)
    ax.set_yscale("log")
    ax.set_ylabel("KL per target token (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    clip = [(r["step"], r["clip_rate"]) for r in rows if "clip_rate" in r]
    if clip:
        ax2.plot(*zip(*clip), color="tab:red")
    ax2.set_ylabel("clip rate")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylim(-0.05, 1.05)
    ax2.grid(alpha=0.3)
    return _save_figure(fig, out_png)


MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rank_grid(ranks: dict[str, int]):
    """{'model.layers.3.self_attn.q_proj': 6, ...} -> (grid[layer][module type], layer ids, module
    types)."""
    cells = {}
    for name, r in ranks.items():
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        cells[(layer, parts[-1])] = r
    layers = sorted({l for l, _ in cells})
    kinds = [k for k in MODULE_ORDER if any(kk == k for _, kk in cells)]
    kinds += sorted({k for _, k in cells} - set(kinds))
    grid = [[cells.get((l, k), 0) for k in kinds] for l in layers]
    return grid, layers, kinds


def plot_rank_heatmap(ranks: dict[str, int], out_png: str | Path,
                      title: str = "rank per module") -> Path:
    """Heatmap of adapter ranks, layers (rows) x module types (columns), as in TriAdaptLoRA's rank
    figures."""
    plt = _pyplot()
    grid, layers, kinds = rank_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2, 0.28 * len(layers) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (total {sum(ranks.values())})", fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    return _save_figure(fig, out_png)


def saved_ranks(adapter_dir) -> dict[str, int]:
    """Per-module ranks recorded in a saved adapter's adapter.json."""
    meta = json.loads(Path(IO.adapter_config_path(adapter_dir)).read_text())
    # masked methods: the ranks in use, not tensor shapes
    return meta.get("active_ranks", meta["ranks"])


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def load_tuned(base: str, adapter_dir: str | None, dtype, device, compute_dtype=None):
    """The base model, or the base with an adapter from `adapter_dir`, or a full checkpoint saved
    there (runs.load_run)."""
    if adapter_dir is None:
        return M.load_pretrained(base, dtype, device, compute_dtype)
    check_intact(Path(adapter_dir))
    return runs.load_run(adapter_dir, base, dtype, device, compute_dtype)[0]


def check_intact(run: Path) -> None:
    """A CheckpointError naming the files of a run or checkpoint folder (and of its full model,
    RUN/model/) that do not read back whole, and the newest checkpoint of the run to use instead
    (train.py's layout: RUN/checkpoints/step-N)."""
    if not run.is_dir():
        return                                          # (load_run says so)
    model_dir = run / IO.FULL_MODEL_DIR
    damaged = unreadable_files(run) + ([f"{IO.FULL_MODEL_DIR}/{problem}"
                                        for problem in unreadable_files(model_dir)]
                                       if model_dir.is_dir() else [])
    if not damaged:
        return
    hint = ""
    ckpt_dir = run.parent if run.parent.name == "checkpoints" else run / "checkpoints"
    for ckpt in sorted(ckpt_dir.glob("step-*"), reverse=True):
        if ckpt.is_dir() and ckpt != run and not unreadable_files(ckpt):
            hint = f"; the newest intact checkpoint of this run is {ckpt}: pass --adapter {ckpt}"
            break
    raise M.CheckpointError(f"{run}: {', '.join(damaged)}: truncated or corrupt{hint}")


def check_args(args) -> None:
    """A ValueError naming the flag for a count out of its range, or for --no-base without
    --adapter (nothing left to evaluate), or for a plot of an adapter's run without --adapter;
    checked before any model is loaded."""
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--max-examples", args.max_examples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base without --adapter leaves nothing to evaluate; give --adapter "
                         "RUN, or drop --no-base")
    for flag, given, run in (
            ("--trust-region-plot", args.trust_region_plot, "a CTR-LoRA run folder"),
            ("--rank-heatmap", args.rank_heatmap,
             "an AdaLoRA, CTR-LoRA or TriAdaptLoRA run folder")):
        if given and not args.adapter:
            raise ValueError(f"{flag} needs --adapter RUN ({run})")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a base model and an adapter side by side.")
    ap.add_argument("--model", default=None,
                    help="base checkpoint folder, name or HF repo id (default: the --adapter "
                         f"run's base, else {M.DEFAULT_MODEL})")
    ap.add_argument("--adapter", default=None,
                    help="a train.py --out folder (adapter, or full model for --method full); "
                         "omit for base only")
    ap.add_argument("--data", nargs="*", default=[],
                    help="data files to evaluate, JSONL or JSON arrays (format detected per "
                         "file)")
    ap.add_argument("--max-examples", type=int, default=None,
                    help="evaluate only the first N records of each file")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--seq-len", type=int, default=256, help="maximum tokens per example")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap prompts in the checkpoint's chat template (default: the --adapter "
                         "run's --chat setting, else off)")
    ap.add_argument("--no-generate", action="store_true",
                    help="skip greedy generation (exact match)")
    ap.add_argument("--no-base", action="store_true",
                    help="evaluate only the adapter, not the base model")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--plot-metrics", nargs="*", default=[],
                    help="metrics.jsonl files (or run folders) to draw as loss curves "
                         "into --plot-out")
    ap.add_argument("--plot-out", default="loss_curves.png", help="PNG file for --plot-metrics")
    ap.add_argument("--trust-region-plot", default=None,
                    help="draw the measured per-step KL against ρ (with κ) and the clip rate "
                         "of a CTR-LoRA run (--adapter folder) into this PNG file")
    ap.add_argument("--reference", default=None,
                    help="a run folder (adapter or full model) whose predictions are the target: "
                         "reports the mean KL(reference ‖ model) per target token "
                         "(prediction alignment)")
    ap.add_argument("--rank-heatmap", default=None,
                    help="draw the per-module ranks of --adapter as a heatmap into this PNG file")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args(argv)
    check_args(args)

    if args.trust_region_plot:
        print(f"wrote "
              f"{plot_trust_region(Path(args.adapter) / 'metrics.jsonl', args.trust_region_plot)}")
    if args.rank_heatmap:
        png = plot_rank_heatmap(saved_ranks(args.adapter), args.rank_heatmap,
                                Path(args.adapter).name)
        print(f"wrote {png}")

    if args.plot_metrics:
        runs = {}
        for p in map(Path, args.plot_metrics):
            f = p / "metrics.jsonl" if p.is_dir() else p
            runs[f.parent.name] = f
        print(f"wrote {plot_loss_curves(runs, args.plot_out)}")
    if not args.data:
        if not (args.plot_metrics or args.rank_heatmap or args.trust_region_plot):
            ap.error("nothing to do: give --data files (and --adapter), --plot-metrics "
                     "or --rank-heatmap")
        return
    # what the run was trained with, unless given: base model, chat template, weights dtype
    settings = IO.read_run_config(args.adapter) if args.adapter else {}
    args.model = args.model or settings.get("model", M.DEFAULT_MODEL)
    args.chat = settings.get("chat", False) if args.chat is None else args.chat
    device = M.parse_device(args.device)
    dtype, compute_dtype = M.weights_dtype_policy(settings.get("weights_dtype", "auto"), device)
    tok = load_tokenizer(M.resolve_checkpoint(args.model))
    variants = (([] if args.no_base else [("base", None)])
                + ([("adapter", args.adapter)] if args.adapter else []))
    results = {}
    reference = (load_tuned(args.model, args.reference, dtype, device, compute_dtype)
                 if args.reference else None)
    for label, adapter_dir in variants:
        net = load_tuned(args.model, adapter_dir, dtype, device, compute_dtype)
        for path in args.data:
            t0 = time.perf_counter()
            r = evaluate_file(net, tok, path, args.seq_len, args.batch_size, args.chat,
                              args.max_examples, not args.no_generate, reference)
            r["seconds"] = round(time.perf_counter() - t0, 2)
            results.setdefault(Path(path).name, {})[label] = r
            print(f"[{label}] {Path(path).name}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in r.items() if k != "samples"),
                  file=sys.stderr)
        del net
    print_table(results)
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


def print_table(results: dict):
    keys = ("loss", "ppl", "exact_match", "acc", "acc_per_token", "kl_to_reference")
    print(f"{'file':28s} {'metric':14s} {'base':>10s} {'adapter':>10s}")
    for file, by_variant in results.items():
        for k in keys:
            vals = [by_variant.get(v, {}).get(k) for v in ("base", "adapter")]
            if all(v is None for v in vals):
                continue
            cells = [f"{v:10.4f}" if v is not None else f"{'-':>10s}" for v in vals]
            print(f"{file[:28]:28s} {k:14s} {cells[0]} {cells[1]}")


if __name__ == "__main__":
    M.cli(main)
