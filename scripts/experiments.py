"""
The evidence of notes/experiments.md: LoRA, AdaLoRA, TriAdaptLoRA, CTR-LoRA and CG-LoRA on the
WordNet category task, each at a learning rate chosen on a dev split, over 5 seeds, with controls,
a stability ladder, out-of-distribution data and measured efficiency. notes/experiments.md states
the protocol; this script carries it out through train.py's and eval.py's command lines (one
subprocess per run, as a user would type it) and writes the note's tables and figures.

    python scripts/experiments.py            # run whatever is missing, then write the report
    python scripts/experiments.py --plan     # list every run and the time estimate; run nothing
    python scripts/experiments.py --report   # only regenerate notes/experiments.md + figures
    python scripts/experiments.py --smoke    # every phase on a tiny configuration (minutes)

What runs (a run is one train.py or eval.py process; --workers of them at a time, 1 thread each):

  base      eval.py on the untuned model: dev, test, OOD. Its dev loss L0 anchors `diverged`.
  grid      per variant a learning-rate ladder on the dev split (--grid-steps, --grid-seeds):
            GRID_START's levels, then one ×√10 level up at a time until some seed diverges
            (full fine-tuning: until the best lr is not the highest), and one level down while
            the best lr is the lowest. `ladder` is the rule; it also gives the stability limit.
  main      every method at its chosen lr, --seeds, --steps; the full fine-tuning reference
            (seeds 0 and 1: the second one measures the KL floor between two full runs).
  controls  AdaLoRA, CTR-LoRA, CTR-LoRA --no-ctr-trust-region at CTR-LoRA's lr (--seeds) and,
            with LoRA, at the lowest lr where LoRA diverged (--div-seeds); CG-LoRA
            --cg-curvature identity at CG-LoRA's lr; TriAdaptLoRA --orth-reg 0 at its lr.
  eval      eval.py on every --steps run: test and OOD (loss, exact match, multiple choice) and
            the KL to the full fine-tuning reference.
  bench     benchmarks/bench_vs_peft.py, alone on the machine at the end (step time, peak memory,
            paired step-time ratios to LoRA).

Resumable: each run's record is written to notes/experiments/results/ the moment it finishes,
and a later invocation skips every finished run (an interrupted one is started again; its run
folder is overwritten). The decisions (chosen lrs, where LoRA diverges) are recomputed from the
records each time, so the runs can be made in pieces. Run folders are runs/experiments/<key>/;
their checkpoints/ folders are deleted once measured (disk), and so are the weights of full
fine-tuning runs that are not the KL reference.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATA = {"train": "data/wordnet_train.jsonl", "dev": "data/wordnet_dev.jsonl",
        "test": "data/wordnet_val.jsonl", "test_choice": "data/wordnet_val_choice.jsonl",
        "ood": "data/wordnet_ood.jsonl", "ood_choice": "data/wordnet_ood_choice.jsonl"}
EVAL_SPLITS = ("test", "test_choice", "ood", "ood_choice")
METHODS = ["lora", "adalora", "triadapt", "ctr", "cg"]
# variant -> (train.py --method, extra flags); every adapter variant also gets --rank 8
VARIANTS = {
    "lora": ("lora", []), "adalora": ("adalora", []), "triadapt": ("triadapt", []),
    "ctr": ("ctr", []), "cg": ("cg", []), "full": ("full", []),
    "ctr-notr": ("ctr", ["--no-ctr-trust-region"]),
    "cg-identity": ("cg", ["--cg-curvature", "identity"]),
    "triadapt-noorth": ("triadapt", ["--orth-reg", "0"]),
}
NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "triadapt": "TriAdaptLoRA", "ctr": "CTR-LoRA",
         "cg": "CG-LoRA", "full": "full FT", "ctr-notr": "CTR-LoRA, no trust region",
         "cg-identity": "CG-LoRA, identity curvature",
         "triadapt-noorth": "TriAdaptLoRA, --orth-reg 0"}
RANK = 8                                   # the equal budget: --rank 8 for every adapter method
# the ×√10 ladder, rounded to one digit: 1e-7, 3e-7, 1e-6, ..., 1, 3 (ratios ×3, ×3.33 alternate)
LADDER = [float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 3)]
GRID_START = {"lora": [3e-3, 1e-2, 3e-2], "triadapt": [3e-3, 1e-2, 3e-2],
              "cg": [3e-3, 1e-2, 3e-2], "adalora": [1e-2, 3e-2, 1e-1], "ctr": [1e-2, 3e-2, 1e-1],
              "ctr-notr": [1e-2, 3e-2, 1e-1], "full": [1e-5, 3e-5, 1e-4]}
LR_RANGE = {"full": (1e-6, 1e-2)}          # the ladder never leaves [low, high]
ADAPTER_LR_RANGE = (1e-4, 1.0)
# ladders that climb until a seed diverges (the stability limit); the others (full fine-tuning)
# climb only while their best lr is the highest one tried
STABILITY_LADDERS = ("lora", "adalora", "triadapt", "ctr", "cg", "ctr-notr")
DIVERGES = "lr where LoRA diverges"       # the role of the controls at that lr
WINDOW = 10                                # rule (d) of `diverged`: window and warm-up, in steps
DEFAULT_OUT = ROOT / "notes" / "experiments"
DEFAULT_RUNS = ROOT / "runs" / "experiments"
DEFAULT_NOTE = ROOT / "notes" / "experiments.md"
BENCH_SETUPS = ["ours-lora", "peft-lora", "ours-adalora", "peft-adalora", "ours-triadapt",
                "ours-ctr", "ours-cg", "paired-adalora", "paired-triadapt", "paired-ctr"]


# ------------------------------------------------------------------------------------------------
# The protocol's rules: one definition each (notes/experiments.md quotes them)
# ------------------------------------------------------------------------------------------------


def finished(rec: dict | None) -> bool:
    """A run that needs no rerun: it exited 0, or train.py stopped it for NaN/inf steps (a result:
    it diverged). A crash or an interruption is run again by the next invocation."""
    return rec is not None and rec.get("status") in ("ok", "diverged-exit")


def diverged(rec: dict, untuned_dev_loss: float) -> bool:
    """A finished training run diverged if
      (a) train.py stopped it with an error after NaN/inf steps (status "diverged-exit"), or
      (b) it dropped a step for a NaN/inf loss or gradient (fewer logged steps than steps), or
      (c) its final dev loss is NaN/inf or not below L0, the untuned model's dev loss, or
      (d) after the first WINDOW (warm-up) steps, the mean training loss over some WINDOW
          consecutive steps exceeds L0."""
    if rec.get("status") == "diverged-exit" or rec.get("nonfinite_lines"):
        return True
    if rec.get("steps_logged", 0) < rec["steps"]:
        return True
    end = rec.get("dev_loss_end")
    if end is None or not math.isfinite(end) or end >= untuned_dev_loss:
        return True
    losses = [loss for step, loss in rec.get("curve", []) if step > WINDOW]
    windows = (sum(losses[i:i + WINDOW]) / WINDOW for i in range(len(losses) - WINDOW + 1))
    return any(not math.isfinite(w) or w > untuned_dev_loss for w in windows)


def ladder_step(lr: float, direction: int) -> float | None:
    i = min(range(len(LADDER)), key=lambda k: abs(math.log(LADDER[k] / lr)))
    j = i + direction
    return LADDER[j] if 0 <= j < len(LADDER) else None


@dataclass
class Ladder:
    """A variant's lr ladder on the dev split, as far as the finished runs decide it."""
    variant: str
    levels: list[float]                     # lrs asked for so far, ascending
    complete: bool = False                  # no level will be added; every run is finished
    chosen: float | None = None             # lowest mean dev loss below the first divergent lr
    first_divergent: float | None = None    # lowest lr at which some seed diverged
    mean_dev: dict = field(default_factory=dict)      # lr -> mean final dev loss of its seeds
    n_diverged: dict = field(default_factory=dict)    # lr -> seeds that diverged


def ladder(variant: str, runs_at, untuned_dev_loss: float | None,
           start: list[float] | None = None) -> Ladder:
    """The lr rule. runs_at(lr) -> the records of that lr's seeds (None: not run yet).

    Start from GRID_START (or `start`); a stability ladder adds the next ×√10 level up while no
    seed has diverged at any level (full fine-tuning: while the best lr is the highest); then one
    level down while the best lr is the lowest (or every level diverged). Only finished levels
    decide. Chosen lr: among the levels below the lowest one where a seed diverged, the lowest
    mean final dev loss."""
    low, high = LR_RANGE.get(variant, ADAPTER_LR_RANGE)
    levels = sorted(lr for lr in start or GRID_START[variant] if low <= lr <= high)
    while True:
        lad = Ladder(variant, list(levels))
        records = {lr: runs_at(lr) for lr in levels}
        if untuned_dev_loss is None or not all(finished(r) for rs in records.values() for r in rs):
            return lad
        for lr, rs in records.items():
            lad.n_diverged[lr] = sum(diverged(r, untuned_dev_loss) for r in rs)
            ends = [r.get("dev_loss_end") for r in rs]
            if all(e is not None and math.isfinite(e) for e in ends):
                lad.mean_dev[lr] = statistics.mean(ends)
        lad.first_divergent = min((lr for lr in levels if lad.n_diverged[lr]), default=None)
        eligible = [lr for lr in levels if lad.first_divergent is None or lr < lad.first_divergent]
        lad.chosen = min(eligible, key=lambda lr: lad.mean_dev[lr]) if eligible else None
        up, down = ladder_step(levels[-1], +1), ladder_step(levels[0], -1)
        climb = (lad.first_divergent is None if variant in STABILITY_LADDERS
                 else lad.chosen == levels[-1])
        if climb and up is not None and up <= high * 1.001:
            levels.append(up)
        elif lad.chosen in (None, levels[0]) and down is not None and down >= low * 0.999:
            levels.insert(0, down)
        else:
            lad.complete = True
            return lad


# ------------------------------------------------------------------------------------------------
# The plan: which runs the finished records call for, in the order they should start
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    key: str                                # results/<key>.json, runs/experiments/<key>/
    kind: str                               # base | train | eval | bench
    variant: str = ""
    lr: float = 0.0
    seed: int = 0
    steps: int = 0
    run: str = ""                           # eval: the training run evaluated
    reference: str = ""                     # eval: the KL reference's training run ('' = none)
    role: str = field(default="", compare=False)


def train_job(variant, lr, seed, steps, role) -> Job:
    return Job(f"{variant}/lr{lr:g}/n{steps}/s{seed}", "train", variant, lr, seed, steps,
               role=role)


def eval_job(run: Job, reference: str, role: str) -> Job:
    return Job("eval/" + run.key, "eval", run.variant, run.lr, run.seed, run.steps, run=run.key,
               reference=reference, role=role)


def untuned_dev_loss(results: dict) -> float | None:
    base = results.get("base")
    return base["splits"]["dev"]["loss"] if base and base.get("status") == "ok" else None


def decisions(results: dict, args) -> dict:
    """Everything the protocol decides from the records so far: a Ladder per variant, and the
    learning rates of the main runs and controls (None while undecided)."""
    l0 = untuned_dev_loss(results)
    ladders = {}
    for v in ladder_variants(args):
        seeds = args.full_grid_seeds if v == "full" else args.grid_seeds
        ladders[v] = ladder(v, lambda lr, v=v, seeds=seeds: [
            results.get(train_job(v, lr, s, args.grid_steps, "").key) for s in seeds], l0,
            args.grid_start.get(v))
    chosen = {v: lad.chosen if lad.complete else None for v, lad in ladders.items()}
    lora = ladders.get("lora")
    return {"untuned_dev_loss": l0, "ladders": ladders, "lr": chosen,
            "lr_lora_diverges": lora.first_divergent if lora and lora.complete else None}


def ladder_variants(args) -> list[str]:
    vs = [m for m in args.methods] + ["full"]
    if "ctr" in args.methods and "controls" in args.phases:
        vs.append("ctr-notr")                # the trust region's own stability ladder
    return vs


def plan(results: dict, args) -> tuple[list[Job], dict]:
    """The jobs the records call for now (finished ones included), in priority order."""
    d = decisions(results, args)
    lr, steps, jobs = d["lr"], args.steps, [Job("base", "base", role="base")]
    for v, lad in d["ladders"].items():
        seeds = args.full_grid_seeds if v == "full" else args.grid_seeds
        jobs += [train_job(v, x, s, args.grid_steps, "grid") for x in lad.levels for s in seeds]
    runs = []                                # --steps runs: each gets an eval
    if "main" in args.phases and lr.get("full"):
        runs += [train_job("full", lr["full"], s, steps, "reference") for s in (0, 1)]
    if "main" in args.phases:
        runs += [train_job(m, lr[m], s, steps, "main")
                 for s in args.seeds for m in args.methods if lr.get(m)]
    if "controls" in args.phases:
        runs += control_jobs(d, args)
    reference = train_job("full", lr["full"], 0, steps, "") if lr.get("full") else None
    ref_ok = reference is not None and results.get(reference.key, {}).get("status") == "ok"
    # every --steps run is evaluated, except those run only for the lr where LoRA diverges
    # (their question is divergence; the dev loss answers it)
    evals = [eval_job(r, "" if r.key == reference.key else reference.key, "eval " + r.role)
             for r in dedupe(runs) if ref_ok and results.get(r.key, {}).get("status") == "ok"
             and not r.role.endswith(DIVERGES)]
    if ref_ok and "main" in args.phases:     # the untuned model's KL to the reference
        evals.append(Job("eval/base", "eval", reference=reference.key, role="eval untuned"))
    jobs = dedupe(jobs + evals + runs)
    pending = [j for j in jobs if not job_done(j, results)]
    if "bench" in args.phases and not pending:
        jobs.append(Job("bench", "bench", role="efficiency (alone on the machine)"))
    return jobs, d


def control_jobs(d: dict, args) -> list[Job]:
    lr, steps, jobs = d["lr"], args.steps, []
    if lr.get("ctr"):
        jobs += [train_job(v, lr["ctr"], s, steps, "control: trust region, CTR-LoRA's lr")
                 for s in args.seeds for v in ("ctr", "adalora", "ctr-notr")]
    if lr.get("ctr") and d["lr_lora_diverges"]:
        jobs += [train_job(v, d["lr_lora_diverges"], s, steps, "control: trust region, " + DIVERGES)
                 for s in args.div_seeds for v in ("lora", "adalora", "ctr", "ctr-notr")]
    if lr.get("cg"):
        jobs += [train_job("cg-identity", lr["cg"], s, steps, "control: whitening")
                 for s in args.seeds]
    if lr.get("triadapt"):
        jobs += [train_job("triadapt-noorth", lr["triadapt"], s, steps,
                           "control: orthogonality penalty") for s in args.seeds]
    return jobs


def dedupe(jobs: list[Job]) -> list[Job]:
    seen, out = set(), []
    for j in jobs:
        if j.key not in seen:
            seen.add(j.key)
            out.append(j)
    return out


def job_done(job: Job, results: dict) -> bool:
    rec = results.get(job.key)
    if job.kind == "train":
        return finished(rec)
    return (rec is not None and rec.get("status") == "ok"
            and rec.get("reference", "") == job.reference)


# ------------------------------------------------------------------------------------------------
# Running one job: the subprocess, its measurements, its record
# ------------------------------------------------------------------------------------------------


class LoadSampler(threading.Thread):
    """The machine's 1-minute load average and CPU busy share, sampled every `every` s, so that
    each run's record says how loaded the machine was while it ran."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.lock = every, [], threading.Lock()

    @staticmethod
    def cpu_ticks() -> tuple[int, int]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return sum(v) - v[3] - (v[4] if len(v) > 4 else 0), sum(v)   # busy, total
        except OSError:
            return 0, 0

    def run(self):
        while True:
            busy, total = self.cpu_ticks()
            with self.lock:
                self.samples.append((time.time(), os.getloadavg()[0], busy, total))
            time.sleep(self.every)

    def between(self, t0: float, t1: float) -> dict:
        with self.lock:
            inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        loads = [s[1] for s in inside]
        (_, _, b0, n0), (_, _, b1, n1) = inside[0], inside[-1]
        return {"load_mean": round(statistics.mean(loads), 2), "load_max": round(max(loads), 2),
                "cpu_busy_share": round((b1 - b0) / (n1 - n0), 3) if n1 > n0 else None}


def code_version() -> str | None:
    """The commit the run's code came from, "+dirty" when tracked files differ from it (records
    made before this field existed have none); None outside a git checkout."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_measured(cmd: list[str], log: Path, args, sampler: LoadSampler) -> dict:
    """cmd from the repository root, output to log, OMP_NUM_THREADS=--threads; wall time, CPU
    time and peak RSS (GNU time, when installed) and the machine's load around and during it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    time_file = log.with_suffix(".time")
    gnu_time = Path("/usr/bin/time")
    wrapped = ([str(gnu_time), "-v", "-o", str(time_file)] if gnu_time.exists() else []) + cmd
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    print("$ " + " ".join(cmd[1:]), flush=True)
    start, load_before = time.time(), os.getloadavg()[0]
    with open(log, "w") as f:
        rc = subprocess.call(wrapped, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    end = time.time()
    out = {"returncode": rc, "command": " ".join(cmd[1:]), "commit": code_version(),
           "started": start, "ended": end,
           "process_wall_s": round(end - start, 1), "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2), **sampler.between(start, end)}
    if time_file.is_file():
        text = time_file.read_text()
        grab = lambda pattern: float(m.group(1)) if (m := re.search(pattern, text)) else None
        rss = grab(r"Maximum resident set size \(kbytes\): (\d+)")
        user, system = grab(r"User time \(seconds\): ([\d.]+)"), grab(
            r"System time \(seconds\): ([\d.]+)")
        out["peak_rss_mib"] = round(rss / 1024, 1) if rss else None
        out["cpu_s"] = round(user + system, 1) if user is not None and system is not None else None
    print(f"  -> exit {rc}, {end - start:.0f} s, peak RSS {out.get('peak_rss_mib')} MiB, "
          f"load {out['load_before']} -> {out['load_after']}", flush=True)
    return out


def status_of(rc: int, log_text: str) -> str:
    if rc == 0:
        return "ok"
    if rc < 0 or rc in (130, 137, 143):                  # a signal: run it again next time
        return "interrupted"
    if re.search(r"non-finite|NaN/inf|FloatingPointError", log_text):
        return "diverged-exit"
    return "failed"


def first_file(folder: Path, *names: str) -> Path | None:
    """The first of `names` that exists in folder (file names of old and new train.py runs)."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_training(run_dir: Path, log_text: str) -> dict:
    """What train.py's metrics.jsonl and log say: loss per step, dev loss at start and end,
    CTR-LoRA's trust-region items per step, CG-LoRA's calibration figures, parameters at start."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if \
        path.is_file() else []
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    extra = [r for r in rows if "loss" not in r and "val_loss" not in r]
    m = re.search(r"([\d,]+) trainable parameters", log_text)
    rnd = lambda x: round(x, 5) if isinstance(x, float) and math.isfinite(x) else x
    out = {"steps_logged": sum(1 for r in train if math.isfinite(r["loss"])),
           "nonfinite_lines": len(re.findall(r"non-finite", log_text)),
           "params_start": int(m.group(1).replace(",", "")) if m else None,
           "train_loop_s": train[-1].get("elapsed_s") if train else None,
           "curve": [[r["step"], rnd(r["loss"])] for r in train],
           "dev_loss_start": val[0]["val_loss"] if val and val[0]["step"] == 0 else None,
           "dev_loss_end": val[-1]["val_loss"] if val and val[-1]["step"] > 0 else None,
           "calibration": extra[0] if extra else None}
    for key in ("kl", "kl_max", "shrink", "clip_rate", "kappa", "total_rank"):
        if any(key in r for r in train):
            out[key] = [rnd(r.get(key)) for r in train]
    return out


def model_dims(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adaptable linear type, from the checkpoint's config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    d, f, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim", d // heads)
    q, kv = heads * head_dim, c["num_key_value_heads"] * head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def read_adapter(run_dir: Path, method: str, model_dir: Path) -> dict:
    """Parameters at the end, counted from the adapter files ('effective': the SVD-form methods'
    active triplets × (d_in + d_out + 1), else every stored tensor but masks), and the final
    per-module ranks in use."""
    from safetensors import safe_open
    config = first_file(run_dir, "adapter.json", "adapter_config.json")
    weights = run_dir / "adapter.safetensors"
    if config is None or not weights.is_file():
        return {}
    cfg = json.loads(config.read_text())
    with safe_open(str(weights), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                     if not k.endswith("mask"))
    ranks = cfg.get("active_ranks") or cfg["ranks"]
    dims = model_dims(model_dir)
    size = lambda name: sum(dims[name.rsplit(".", 1)[-1]])
    effective = (sum(r * (size(n) + 1) for n, r in ranks.items()) if method in ("adalora", "ctr")
                 else stored)
    return {"params_end": effective, "params_stored": stored, "ranks_end": ranks}


W0_SQ: dict[str, float] = {}                # ‖W0‖² per adapted module (read once per process)
W0_LOCK = threading.Lock()


def base_norms(model_dir: Path) -> dict[str, float]:
    import torch
    from safetensors import safe_open
    with W0_LOCK:
        if not W0_SQ:
            with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
                for k in f.keys():
                    if k.endswith("_proj.weight"):
                        W0_SQ[k[:-len(".weight")]] = float(f.get_tensor(k).double().square().sum())
        return W0_SQ


def update_norm(run_dir: Path, method: str, model_dir: Path) -> float | None:
    """‖ΔW‖_F / ‖W0‖_F over every adapted linear: the size of the update each method made. Adapter
    runs: ΔW = (alpha_m / r_m) B A from the peft export (plain LoRA form of every method, CG-LoRA's
    initial step included); full fine-tuning: W - W0."""
    import torch
    from safetensors import safe_open
    torch.set_num_threads(1)
    w0 = base_norms(model_dir)
    delta_sq = 0.0
    if method == "full":
        weights = first_file(run_dir / "model", "model.safetensors") or first_file(
            run_dir, "model.safetensors")
        if weights is None:
            return None
        with safe_open(str(weights), "pt") as f, \
                safe_open(str(model_dir / "model.safetensors"), "pt") as g:
            for name in w0:
                diff = f.get_tensor(name + ".weight").double() - g.get_tensor(name + ".weight")
                delta_sq += float(diff.square().sum())
        return math.sqrt(delta_sq / sum(w0.values()))
    peft = run_dir / "peft"
    if not (peft / "adapter_model.safetensors").is_file():
        return None
    pc = json.loads((peft / "adapter_config.json").read_text())
    adapted = 0.0
    with safe_open(str(peft / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            a = f.get_tensor(key).double()                                       # (r, d_in)
            b = f.get_tensor(key.replace("lora_A", "lora_B")).double()          # (d_out, r)
            r = pc.get("rank_pattern", {}).get(name, pc["r"])
            scale = pc.get("alpha_pattern", {}).get(name, pc["lora_alpha"]) / max(r, 1)
            delta_sq += scale ** 2 * float(((b.T @ b) * (a @ a.T)).sum())  # ‖BA‖² = tr(BᵀB AAᵀ)
            adapted += w0[name]
    return math.sqrt(delta_sq / adapted) if adapted else None


def run_train(job: Job, args, sampler) -> dict:
    method, extra = VARIANTS[job.variant]
    run_dir = args.runs_dir / job.key
    cmd = [PY, "train.py", "--method", method, "--data", DATA["train"], "--val-data", DATA["dev"],
           "--eval-examples", str(args.eval_examples or 100_000), "--out", rel(run_dir),
           "--steps", str(job.steps), "--lr", f"{job.lr:g}", "--seed", str(job.seed),
           "--threads", str(args.threads), "--log-every", "1", "--eval-every", "0",
           "--save-every", "0", "--overwrite"]
    cmd += (["--rank", str(RANK)] if method != "full" else []) + extra
    cmd += ["--model", args.model] if args.model else []
    log = args.runs_dir / "logs" / (job.key.replace("/", "_") + ".train.log")
    rec = {"kind": "train", "variant": job.variant, "method": method, "flags": extra,
           "lr": job.lr, "seed": job.seed, "steps": job.steps,
           **run_measured(cmd, log, args, sampler)}
    text = log.read_text(errors="replace")
    rec["status"] = status_of(rec["returncode"], text)
    rec.update(read_training(run_dir, text))
    model_dir = model_folder(args)
    if rec["status"] == "ok":
        if method == "full":
            rec["params_end"] = rec["params_start"]
        else:
            rec.update(read_adapter(run_dir, method, model_dir))
        rec["update_norm"] = update_norm(run_dir, method, model_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if method == "full" and job.steps != args.steps:      # only the --steps runs are references
        for p in [run_dir / "model", run_dir / "model.safetensors"]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return rec


def run_eval(job: Job, args, sampler) -> dict:
    """eval.py on one run (or, for the base job, on the untuned model)."""
    out_json = args.runs_dir / "evals" / (job.key.replace("/", "_") + ".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    splits = ("dev",) + EVAL_SPLITS if job.kind == "base" else EVAL_SPLITS
    cmd = [PY, "eval.py", "--data", *[DATA[s] for s in splits], "--out", rel(out_json)]
    cmd += ["--max-examples", str(args.eval_examples)] if args.eval_examples else []
    cmd += ["--model", args.model] if args.model else []
    if job.run:
        cmd += ["--adapter", rel(args.runs_dir / job.run), "--no-base"]
    if job.reference:
        cmd += ["--reference", rel(args.runs_dir / job.reference)]
    log = args.runs_dir / "logs" / (job.key.replace("/", "_") + ".log")
    out_json.unlink(missing_ok=True)
    rec = {"kind": job.kind, "run": job.run, "reference": job.reference,
           **run_measured(cmd, log, args, sampler)}
    rec["status"] = "ok" if rec["returncode"] == 0 and out_json.is_file() else status_of(
        rec["returncode"] or 1, "")
    if rec["status"] == "ok":
        raw = json.loads(out_json.read_text())
        label = "adapter" if job.run else "base"
        rec["splits"] = {}
        for s in splits:
            r = raw[Path(DATA[s]).name][label]
            rec["splits"][s] = {k: r.get(k) for k in ("loss", "exact_match", "kl_to_reference",
                                                      "acc", "acc_per_token", "examples")
                                if r.get(k) is not None}
    return rec


def run_bench(job: Job, args, sampler) -> dict:
    """benchmarks/bench_vs_peft.py at the same settings for every method (batch 4 × 128 tokens,
    rank 8, --threads), its paired setups for the step-time ratios to LoRA."""
    out_json = args.runs_dir / "bench_vs_peft.json"
    cmd = [PY, "benchmarks/bench_vs_peft.py", "--workloads", args.bench_workload,
           "--threads", str(args.threads), "--rounds", str(args.bench_rounds),
           "--idle-wait", str(args.bench_idle_wait), "--setups", *BENCH_SETUPS,
           "--json", rel(out_json)]
    out_json.unlink(missing_ok=True)
    rec = {"kind": "bench", **run_measured(cmd, args.runs_dir / "logs" / "bench.log", args,
                                             sampler)}
    rec["status"] = "ok" if rec["returncode"] == 0 and out_json.is_file() else "failed"
    if rec["status"] == "ok":
        raw = json.loads(out_json.read_text())
        rec["workload"] = args.bench_workload
        rec["args"] = {k: raw["args"].get(k) for k in ("batch", "seq", "threads", "rounds",
                                                       "steps", "tiny_steps")}
        rec["figures"] = raw["figures"].get(args.bench_workload, {})
        rec["setups"] = {}
        for setup, workers in raw["results"].get(args.bench_workload, {}).items():
            rec["setups"][setup] = {
                "step_s": median_of(workers, "step_s"), "peak_mib": median_of(workers, "peak_mib"),
                "lora_step_s": median_of(workers, "lora_step_s"), "workers": len(workers),
                "others_share_max": max(w.get("others_share", 0.0) for w in workers),
                "pair_ratios": [m / l for w in workers
                                for m, l in zip(w["step_s"], w.get("lora_step_s", []))]}
    return rec


def median_of(workers: list[dict], key: str) -> float | None:
    """Median over bench workers of their value (their median where it is a per-step list)."""
    values = [statistics.median(w[key]) if isinstance(w[key], list) else w[key]
              for w in workers if w.get(key) not in (None, [])]
    return statistics.median(values) if values else None


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def model_folder(args) -> Path:
    name = args.model or "smollm2-135m"
    return Path(name) if Path(name).is_dir() else ROOT / "checkpoints" / name


# ------------------------------------------------------------------------------------------------
# Records on disk, the scheduler, the plan
# ------------------------------------------------------------------------------------------------


def record_path(out_dir: Path, key: str) -> Path:
    return out_dir / "results" / (key.replace("/", "__") + ".json")


def load_results(out_dir: Path) -> dict:
    records = [json.loads(p.read_text()) for p in sorted((out_dir / "results").glob("*.json"))]
    return {rec.pop("key"): rec for rec in records}


def save_record(out_dir: Path, key: str, rec: dict) -> None:
    path = record_path(out_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, **rec}, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def schedule(results: dict, args, start, wait_one) -> list[Job]:
    """Start the planned jobs that are not done, --workers at a time (the bench job alone),
    re-planning after every finished job. start(job) launches it; wait_one() -> (key, record)
    waits for one. A job is tried at most once per invocation. Returns the jobs started."""
    running, tried, order = {}, set(), []
    while True:
        for job in plan(results, args)[0]:
            if len(running) >= args.workers or any(j.kind == "bench" for j in running.values()):
                break
            if job_done(job, results) or job.key in running or job.key in tried:
                continue
            if job.kind == "bench" and running:
                break
            start(job)
            running[job.key] = job
            tried.add(job.key)
            order.append(job)
        if not running:
            return order
        key, rec = wait_one()
        del running[key]
        results[key] = rec


SETTINGS = ["methods", "phases", "seeds", "steps", "grid_steps", "grid_seeds", "full_grid_seeds",
            "div_seeds", "grid_start", "eval_examples", "workers", "threads", "model",
            "bench_workload", "bench_rounds", "bench_idle_wait"]


def run_all(args) -> None:
    results = load_results(args.out_dir)
    results["settings"] = {"kind": "settings", "args": {k: getattr(args, k) for k in SETTINGS}}
    save_record(args.out_dir, "settings", results["settings"])
    sampler = LoadSampler()
    sampler.start()
    runners = {"train": run_train, "eval": run_eval, "base": run_eval, "bench": run_bench}
    futures = {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        def start(job):
            futures[pool.submit(runners[job.kind], job, args, sampler)] = job

        def wait_one():
            done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            fut = next(iter(done))
            job = futures.pop(fut)
            rec = {**fut.result(), "role": job.role,
                   "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
            save_record(args.out_dir, job.key, rec)
            return job.key, rec

        started = schedule(results, args, start, wait_one)
    jobs, _ = plan(results, args)
    left = [j.key for j in jobs if not job_done(j, results)]
    print(f"started {len(started)} runs; {len(left)} planned runs not done"
          + (f" (failed or waiting on failed runs; logs in {rel(args.runs_dir)}/logs): "
             + ", ".join(left[:10]) if left else ""), flush=True)


# --- the plan: the same scheduler on a virtual clock, with assumed outcomes for future runs --

# Only to size the plan (never a result): where each ladder is assumed to diverge and to be best,
# guessed from the 20-step runs of the older protocol.
ASSUMED_FIRST_DIVERGENT = {"lora": 3e-2, "triadapt": 3e-2, "cg": 3e-2, "adalora": 0.3,
                           "ctr": 1.0, "ctr-notr": 0.3, "full": 1e-3}
ASSUMED_BEST = {"lora": 1e-2, "triadapt": 1e-2, "cg": 1e-2, "adalora": 3e-2, "ctr": 0.1,
                "ctr-notr": 3e-2, "full": 3e-5}
# seconds per training step (one thread) and per run: 30-step runs of every variant, 2 at a time,
# on this machine while other jobs ran (load average 3-4 on 2 cores; idle should be faster).
# Medians of the saved records replace them as runs finish.
STEP_S = {"lora": 1.25, "adalora": 1.45, "triadapt": 1.3, "ctr": 3.0, "ctr-notr": 1.3, "cg": 1.1,
          "cg-identity": 1.2, "triadapt-noorth": 1.3, "full": 2.3}
TRAIN_OVERHEAD_S = {"cg": 70, "cg-identity": 70, "full": 45}   # model load, calibration, saving
DEFAULT_TRAIN_OVERHEAD_S = 33
EVAL_S, BASE_S, BENCH_S = 140, 170, 1200


def cost_model(results: dict) -> dict:
    """Per-variant step seconds and overheads: medians of the finished runs, else the defaults."""
    step_s, overhead = dict(STEP_S), {v: TRAIN_OVERHEAD_S.get(v, DEFAULT_TRAIN_OVERHEAD_S)
                                      for v in VARIANTS}
    for v in VARIANTS:
        rs = [r for r in results.values() if r.get("kind") == "train" and r.get("variant") == v
              and r.get("status") == "ok" and r.get("train_loop_s") and r["steps"] >= 20]
        if rs:
            step_s[v] = statistics.median(r["train_loop_s"] / r["steps"] for r in rs)
            overhead[v] = statistics.median(r["process_wall_s"] - r["train_loop_s"] for r in rs)
    kind_s = {}
    for kind, default in (("eval", EVAL_S), ("base", BASE_S), ("bench", BENCH_S)):
        rs = [r["process_wall_s"] for r in results.values() if r.get("kind") == kind
              and r.get("status") == "ok"]
        kind_s[kind] = statistics.median(rs) if rs else default
    return {"step_s": step_s, "overhead": overhead, "kind_s": kind_s}


def estimate_s(job: Job, cost: dict) -> float:
    if job.kind == "train":
        return cost["overhead"][job.variant] + job.steps * cost["step_s"][job.variant]
    return cost["kind_s"][job.kind]


def assumed_record(job: Job) -> dict:
    """A stand-in record for a run that has not been made (--plan only)."""
    if job.kind == "base":
        return {"kind": "base", "status": "ok", "splits": {"dev": {"loss": 10.0}}, "assumed": True}
    if job.kind != "train":
        return {"kind": job.kind, "status": "ok", "reference": job.reference, "assumed": True}
    grid = job.variant in ASSUMED_BEST
    bad = grid and job.lr >= ASSUMED_FIRST_DIVERGENT[job.variant] * 0.999
    dev = abs(math.log10(job.lr / ASSUMED_BEST[job.variant])) + 1.0 if grid else 1.0
    return {"kind": "train", "status": "ok", "variant": job.variant, "lr": job.lr,
            "steps": job.steps, "steps_logged": job.steps, "curve": [], "assumed": True,
            "dev_loss_end": math.inf if bad else dev}


def show_plan(args) -> None:
    results = load_results(args.out_dir)
    cost = cost_model(results)
    sim = dict(results)
    clock, heap, ends = [0.0], [], {}

    def start(job):
        ends[job.key] = (clock[0], clock[0] + estimate_s(job, cost), job)
        heapq.heappush(heap, (ends[job.key][1], job.key, job))

    def wait_one():
        t, key, job = heapq.heappop(heap)
        clock[0] = max(clock[0], t)
        return key, assumed_record(job)

    schedule(sim, args, start, wait_one)
    jobs, d = plan(sim, args)
    known = {j.key for j in plan(results, args)[0]}     # called for by the records alone
    print(f"{'run':48s} {'role':46s} {'est. s':>7s}  status")
    for job in jobs:
        status = ("done" if job_done(job, results) else "to run" if job.key in known
                  else "assumed")
        print(f"{job.key:48s} {job.role[:46]:46s} {estimate_s(job, cost):7.0f}  {status}")
    todo = [j for j in jobs if not job_done(j, results)]
    process_s = sum(estimate_s(j, cost) for j in todo)
    print(f"\n{len(jobs)} runs in the plan, {len(jobs) - len(todo)} done, {len(todo)} to run: "
          f"{process_s / 3600:.1f} process-hours; with {args.workers} processes at a time "
          f"(the bench alone) about {clock[0] / 3600:.1f} h of wall time.")
    print("Per-step times: " + ", ".join(f"{v} {s:.2f} s" for v, s in cost["step_s"].items())
          + f"; eval {cost['kind_s']['eval']:.0f} s, bench {cost['kind_s']['bench']:.0f} s "
          "(medians of the saved runs where there are any, else STEP_S: measured at load 3-4). "
          "Ladder levels past GRID_START are guesses (ASSUMED_FIRST_DIVERGENT).")
    print("Learning rates in this plan: " + ", ".join(
        f"{v} {d['lr'][v]:g}" for v in d["lr"] if d["lr"][v]) + (
        f"; LoRA diverges at {d['lr_lora_diverges']:g}" if d["lr_lora_diverges"] else ""))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only regenerate the note and figures")
    ap.add_argument("--plan", action="store_true", help="list every run and the time estimate")
    ap.add_argument("--smoke", action="store_true",
                    help="every phase on a tiny configuration, into runs/experiments-smoke/ "
                         "(the note there too); other flags still apply after it")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--phases", nargs="+", default=["grid", "main", "controls", "bench"],
                    choices=["grid", "main", "controls", "bench"],
                    help="the base evaluation and the lr ladders always run (every phase needs "
                         "them)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=200, help="steps of the main runs and controls")
    ap.add_argument("--grid-steps", type=int, default=100, help="steps of the lr ladder runs")
    ap.add_argument("--grid-seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--full-grid-seeds", nargs="+", type=int, default=[0],
                    help="seeds of full fine-tuning's (smaller) lr ladder")
    ap.add_argument("--div-seeds", nargs="+", type=int, default=[0, 1],
                    help="seeds of the controls at the lr where LoRA diverges")
    ap.add_argument("--grid-start", nargs="*", default=[], metavar="VARIANT=LR,LR",
                    help="first levels of a variant's lr ladder instead of GRID_START's")
    ap.add_argument("--eval-examples", type=int, default=0,
                    help="examples per file for eval.py and train.py's dev loss (0 = all)")
    ap.add_argument("--workers", type=int, default=2, help="processes at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--model", default="", help="checkpoint (default: train.py's, SmolLM2-135M)")
    ap.add_argument("--bench-workload", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--bench-rounds", type=int, default=3)
    ap.add_argument("--bench-idle-wait", type=float, default=60.0,
                    help="bench_vs_peft's --idle-wait: seconds to wait for an idle machine")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                    help="records (results/) and figures")
    ap.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS, help="run folders and logs")
    ap.add_argument("--note", type=Path, default=DEFAULT_NOTE, help="the note --report writes")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:                      # defaults first, so that later flags still apply
        smoke = ROOT / "runs" / "experiments-smoke"
        argv = ["--methods", "lora", "ctr", "--seeds", "0", "--grid-seeds", "0",
                "--div-seeds", "0", "--steps", "6", "--grid-steps", "4", "--eval-examples", "8",
                "--grid-start", "lora=0.1,0.3", "ctr=0.1,0.3", "ctr-notr=0.1,0.3",
                "full=3e-5,1e-4",
                "--bench-workload", "tiny", "--bench-rounds", "1", "--bench-idle-wait", "0",
                "--out-dir", str(smoke / "notes"), "--runs-dir", str(smoke / "runs"),
                "--note", str(smoke / "notes" / "experiments.md")] + argv
    args = ap.parse_args(argv)
    args.out_dir, args.runs_dir = args.out_dir.resolve(), args.runs_dir.resolve()
    try:
        args.grid_start = {v: sorted(float(x) for x in lrs.split(","))
                           for v, lrs in (item.split("=") for item in args.grid_start)}
    except ValueError:
        ap.error("--grid-start takes VARIANT=LR,LR,... items, e.g. lora=1e-3,3e-3")
    unknown = set(args.grid_start) - set(GRID_START)
    if unknown:
        ap.error(f"--grid-start: no ladder for {', '.join(sorted(unknown))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        show_plan(args)
        return
    if not args.report:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        lock = open(args.runs_dir / ".lock", "w")          # one runner per results folder
        import fcntl
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another scripts/experiments.py is running on {args.runs_dir}")
        run_all(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import experiments_report
    experiments_report.write_report(load_results(args.out_dir), args)


if __name__ == "__main__":
    main()
