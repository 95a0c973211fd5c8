"""
The method comparison of notes/experiments.md: every method on the WordNet demo task at an equal trainable budget,
on CPU, through train.py and eval.py's command lines (one subprocess per run, exactly as a user would type them).

    .venv/bin/python scripts/experiments.py              # run whatever is missing, then write the note and figures
    .venv/bin/python scripts/experiments.py --report     # only rewrite notes/experiments.md + PNGs from the JSON

Phases (each run is skipped when notes/experiments/results.json already holds it, so an interrupted run loses at
most the run in progress; --force redoes the selected ones):

  1. sweep   LoRA, AdaLoRA and CTR-LoRA at --sweep-lrs, seed 0, --sweep-steps steps: stability (does the loss blow
             up / go NaN?) and the per-method learning rate of phase 3 (lowest end-of-run validation loss among the
             runs that did not diverge). TriAdaptLoRA and CG-LoRA train B·A-form factors like LoRA and take LoRA's.
  2. full    full fine-tuning at --full-lrs (seed 0, --full-steps): the better one is the reference of the KL column.
  3. main    lora, adalora, triadapt, ctr, cg × --seeds at --steps; each followed by eval.py on --eval-examples
             of data/wordnet_val.jsonl (loss, exact match, KL to the full run) and data/wordnet_val_choice.jsonl.
  4. report  tables (mean ± std over seeds), loss curves, LR-sweep curves, rank heatmaps → notes/experiments.md.

Equal budget: every method gets --rank 8. LoRA/CG-LoRA then have rank 8 everywhere; AdaLoRA and CTR-LoRA start at
r₀ = 12 triplets per module and keep a global budget of 8 × modules triplets; TriAdaptLoRA starts at rank 4 and
grows towards a budget of 8 × modules. The table reports the trainable parameters each run ends with, counted from
its adapter files (active triplets for the SVD-form methods), next to LoRA r = 8.

Peak memory is the peak RSS of the train.py process (GNU time's "Maximum resident set size"); wall time is the
process's wall clock (model load, calibration, validation and saving included) and the training loop's own time.
Both were measured on a shared 2-core machine: the load average before and after each run is recorded with it.
"""

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUNS = ROOT / "runs" / "experiments"
OUT = ROOT / "notes" / "experiments"
RESULTS = OUT / "results.json"
NOTE = ROOT / "notes" / "experiments.md"
TRAIN_DATA, VAL_DATA, CHOICE_DATA = "data/wordnet_train.jsonl", "data/wordnet_val.jsonl", "data/wordnet_val_choice.jsonl"
METHODS = ["lora", "adalora", "triadapt", "ctr", "cg"]
NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "triadapt": "TriAdaptLoRA", "ctr": "CTR-LoRA", "cg": "CG-LoRA",
         "full": "full FT"}
LR_FAMILY = {"lora": "lora", "triadapt": "lora", "cg": "lora", "adalora": "adalora", "ctr": "ctr", "cg-shift": "lora"}
# diagnostic variants: name -> (train.py --method, extra flags); seed 0 only, after the main comparison
VARIANTS = {"cg-shift": ("cg", ["--cg-variant", "shift"])}
NAMES["cg-shift"] = "CG-LoRA shift (diagnostic)"
SVD_FORM = {"adalora", "ctr"}
COMMAND = "`.venv/bin/python scripts/experiments.py`"
REPORT_COMMAND = "`.venv/bin/python scripts/experiments.py --report`"


# ----------------------------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------------------------


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"runs": {}}


LOCK = threading.Lock()          # the worker threads share the results dict and its file


def save_results(results: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(RESULTS)


# ----------------------------------------------------------------------------------------------------------------
# one subprocess, timed and measured
# ----------------------------------------------------------------------------------------------------------------


THREADS = 1                      # torch intra-op threads per subprocess (set by --threads)


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run cmd from the repository root with its output in log; return exit code, wall time, peak RSS, CPU time.
    The subprocess gets OMP_NUM_THREADS=THREADS: on a machine shared with other jobs, 2-thread torch processes
    spent most of their time in OpenMP barriers (measured: 37 s/step with 2 threads vs 3 s/step with 1 thread at a
    load average of 8), so this script runs single-threaded processes, --workers of them at a time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    time_file = log.with_suffix(".time")
    wrapped = (["/usr/bin/time", "-v", "-o", str(time_file)] if Path("/usr/bin/time").exists() else []) + cmd
    print("$ " + " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(wrapped, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)})
    wall = time.perf_counter() - t0
    out = {"returncode": rc, "process_wall_s": round(wall, 1), "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2)}
    if time_file.is_file():                               # GNU time -v: peak RSS in KiB, CPU seconds
        text = time_file.read_text()
        grab = lambda pat: (m := re.search(pat, text)) and float(m.group(1))
        out["peak_rss_mib"] = round((grab(r"Maximum resident set size \(kbytes\): (\d+)") or 0) / 1024, 1)
        out["cpu_s"] = round((grab(r"User time \(seconds\): ([\d.]+)") or 0)
                             + (grab(r"System time \(seconds\): ([\d.]+)") or 0), 1)
    print(f"  -> rc {rc}, {wall:.0f}s, peak RSS {out.get('peak_rss_mib', '?')} MiB, "
          f"load {out['load_before']} -> {out['load_after']}", flush=True)
    return out


def adopt(log: Path) -> dict | None:
    """The measurements of a run that completed while no driver was recording it (its driver was stopped, the
    subprocess ran on): its log says done and GNU time wrote its file. None if there is no such run."""
    time_file = log.with_suffix(".time")
    if not (log.is_file() and time_file.is_file() and "done:" in log.read_text(errors="replace")):
        return None
    text = time_file.read_text()
    if "Exit status: 0" not in text:
        return None
    grab = lambda pat: (m := re.search(pat, text)) and m.group(1)
    h, mnt, sec = ([0] + grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)").split(":"))[-3:]
    print(f"adopted finished run {log}", flush=True)
    return {"returncode": 0, "process_wall_s": round(float(h) * 3600 + float(mnt) * 60 + float(sec), 1),
            "load_before": None, "load_after": None, "adopted": True,
            "peak_rss_mib": round(float(grab(r"Maximum resident set size \(kbytes\): (\d+)")) / 1024, 1),
            "cpu_s": round(float(grab(r"User time \(seconds\): ([\d.]+)")) + float(grab(r"System time \(seconds\): ([\d.]+)")), 1)}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def module_dims(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adaptable linear type, from the checkpoint's config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c.get("head_dim", d // c["num_attention_heads"])
    q = c["num_attention_heads"] * c.get("head_dim", d // c["num_attention_heads"])
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def adapter_config_file(run_dir: Path) -> Path:
    """A run's adapter.json (adapter_config.json in runs written before that name)."""
    new, legacy = run_dir / "adapter.json", run_dir / "adapter_config.json"
    return legacy if legacy.is_file() and not new.is_file() else new


def parameter_counts(run_dir: Path, method: str) -> dict:
    """Trainable parameters a run ends with. 'stored': every tensor of adapter.safetensors except rank masks (for
    the SVD-form methods that includes masked-out triplets); 'effective': what the final adapter uses — for
    AdaLoRA/CTR-LoRA the active triplets × (d_in + d_out + 1), otherwise the stored count."""
    from safetensors import safe_open                    # imported here: --report does not need it
    cfg = json.loads(adapter_config_file(run_dir).read_text())
    stored = 0
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as f:
        for k in f.keys():
            if not k.endswith("mask"):
                stored += math.prod(f.get_slice(k).get_shape())
    dims = module_dims(ROOT / "checkpoints" / "smollm2-135m")
    ranks = cfg.get("active_ranks") or cfg["ranks"]
    dim = lambda name: dims[name.rsplit(".", 1)[-1]]
    lora_r8 = sum(8 * sum(dim(n)) for n in cfg["ranks"])
    if method in SVD_FORM:
        effective = sum(r * (sum(dim(n)) + 1) for n, r in ranks.items())
    elif method in ("lora", "cg", "cg-shift"):            # B and A; CG-LoRA 'shift' also stores its frozen start
        effective = sum(r * sum(dim(n)) for n, r in ranks.items())
    else:                                               # TriAdaptLoRA: A, B and the r × r core, all trainable
        effective = stored
    return {"stored": stored, "effective": effective, "lora_r8": lora_r8, "modules": len(ranks),
            "rank_sum": sum(ranks.values()), "rank_min": min(ranks.values()), "rank_max": max(ranks.values())}


def summarize_training(run_dir: Path, log: Path) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    text = log.read_text(errors="replace") if log.is_file() else ""
    m = re.search(r"([\d,]+) trainable parameters", text)
    done = re.search(r"done: (\d+) steps in (\d+)s", text)
    losses = [r["loss"] for r in train]
    finite = [x for x in losses if math.isfinite(x)]
    return {
        "initial_trainable": int(m.group(1).replace(",", "")) if m else None,
        "train_loop_s": float(done.group(2)) if done else (train[-1].get("elapsed_s") if train else None),
        "nonfinite_steps": len(re.findall(r"non-finite (?:loss|gradient)\b.*step skipped", text)),
        "aborted": re.search(r"non-finite (?:losses|steps) in a row", text) is not None,
        "val_loss_start": val[0]["val_loss"] if val else None,
        "val_loss_end": val[-1]["val_loss"] if len(val) > 1 else None,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_peak": max(finite) if finite else None,
        "train_loss_final": losses[-1] if losses else None,
        "curve": [[r["step"], r["loss"]] for r in train],
        "val_curve": [[r["step"], r["val_loss"]] for r in val],
        "clip_rate_mean": (statistics.mean(r["clip_rate"] for r in train if "clip_rate" in r)
                           if any("clip_rate" in r for r in train) else None),
    }


def diverged(rec: dict) -> bool:
    """A run diverged if it aborted or crashed, skipped a non-finite step, ended with a validation loss no better
    than where it started, or its training loss (5-step window) rose above the untuned model's loss (the step-0
    validation loss): the fine-tuning made the model worse than no fine-tuning at some point."""
    if rec["returncode"] != 0 or rec.get("aborted") or rec.get("nonfinite_steps"):
        return True
    v0, v1 = rec.get("val_loss_start"), rec.get("val_loss_end")
    peak = rec.get("train_loss_peak")
    return v1 is None or not math.isfinite(v1) or v1 >= v0 or (peak is not None and peak > v0)


# ----------------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------------


def train_cmd(method: str, out: Path, steps: int, lr: float, seed: int, args) -> list[str]:
    method, extra = VARIANTS.get(method, (method, []))
    cmd = [PY, "train.py", "--method", method, "--data", TRAIN_DATA, "--val-data", VAL_DATA,
           "--out", str(out.relative_to(ROOT)), "--steps", str(steps), "--lr", f"{lr:g}", "--seed", str(seed),
           "--eval-examples", str(args.eval_examples), "--eval-every", "0", "--save-every", "0",
           "--log-every", "5", "--overwrite"]
    if method != "full":
        cmd += ["--rank", "8"]
    return cmd + extra


def finished(rec: dict | None) -> bool:
    """A run counts as done if it exited 0 or aborted on non-finite losses (a result of the sweep); a run that was
    interrupted (signal, crash) is done again."""
    return rec is not None and (rec.get("returncode") == 0 or bool(rec.get("aborted")))


def do_train(results, key, method, steps, lr, seed, args, evaluate_with=None):
    if finished(results["runs"].get(key)) and not args.force:
        return results["runs"][key]
    twin = f"sweep/{method}-lr{lr:g}"                     # the same command already ran in the sweep: reuse it
    if (key.startswith("main/") and seed == 0 and steps == args.sweep_steps and not args.force
            and finished(results["runs"].get(twin)) and results["runs"][twin]["returncode"] == 0):
        rec = {**results["runs"][twin], "reused_from": twin}
        if evaluate_with is not None:
            rec["eval"] = do_eval(RUNS / twin, evaluate_with, key, args)
        with LOCK:
            results["runs"][key] = rec
            save_results(results)
        return rec
    run_dir = RUNS / key
    cmd = train_cmd(method, run_dir, steps, lr, seed, args)
    rec = {"method": method, "lr": lr, "seed": seed, "steps": steps, "command": " ".join(cmd[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    log = RUNS / "logs" / f"{key}.train.log"
    while subprocess.run(["pgrep", "-f", f"train.py .*--out {run_dir.relative_to(ROOT)} "],
                         stdout=subprocess.DEVNULL).returncode == 0:
        time.sleep(10)                                  # a stopped driver's run still going on: wait, then adopt it
    adopted = adopt(log) if not args.force else None
    rec.update(adopted or run_measured(cmd, log))
    if adopted:                          # record the steps that run was given (its log), not what we asked now
        rec["steps"] = int(re.search(r"done: (\d+) steps", log.read_text(errors="replace")).group(1))
        rec["command"] = " ".join(train_cmd(method, run_dir, rec["steps"], lr, seed, args)[1:])
    rec.update(summarize_training(run_dir, RUNS / "logs" / f"{key}.train.log"))
    if rec["returncode"] == 0 and method != "full":
        rec["params"] = parameter_counts(run_dir, method)
    rec["diverged"] = diverged(rec)
    if evaluate_with is not None and rec["returncode"] == 0:
        rec["eval"] = do_eval(run_dir, evaluate_with, key, args)
    with LOCK:
        results["runs"][key] = rec
        save_results(results)
    return rec


def do_eval(run_dir: Path, reference: Path | None, key: str, args) -> dict:
    key = key.replace("/", "-")
    out_json = RUNS / "evals" / f"{key}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "eval.py", "--data", VAL_DATA, CHOICE_DATA, "--max-examples", str(args.eval_examples),
           "--out", str(out_json.relative_to(ROOT))]
    cmd += ["--adapter", str(run_dir.relative_to(ROOT)), "--no-base"] if run_dir is not None else []
    cmd += ["--reference", str(reference.relative_to(ROOT))] if reference is not None else []
    log = RUNS / "logs" / f"{key}.eval.log"
    done_before = (out_json.is_file() and log.is_file() and run_dir is not None and not args.force
                   and out_json.stat().st_mtime > (run_dir / "metrics.jsonl").stat().st_mtime)
    meas = ({"returncode": 0, "process_wall_s": None} if done_before     # an evaluation already made for this run
            else run_measured(cmd, log))
    if meas["returncode"] != 0:
        return {"command": " ".join(cmd[1:]), **meas}
    raw = json.loads(out_json.read_text())
    label = "adapter" if run_dir is not None else "base"
    val, choice = raw[Path(VAL_DATA).name][label], raw[Path(CHOICE_DATA).name][label]
    return {"command": " ".join(cmd[1:]), "eval_wall_s": meas["process_wall_s"], "val_loss": val["loss"],
            "exact_match": val.get("exact_match"), "kl_to_full": val.get("kl_to_reference"),
            "choice_acc": choice.get("acc"), "choice_acc_per_token": choice.get("acc_per_token")}


def chosen_lrs(results: dict, args) -> dict[str, float]:
    """Per-method learning rate of the main comparison: the sweep's best non-diverged run of the method's family."""
    best = {}
    for fam in ("lora", "adalora", "ctr"):
        grid = args.sweep_lrs if fam in ("lora", "ctr") else args.adalora_lrs     # not the extra points
        runs = [r for k, r in results["runs"].items()
                if k.startswith(f"sweep/{fam}-") and not r["diverged"] and r["lr"] in grid]
        if runs:
            best[fam] = min(runs, key=lambda r: r["val_loss_end"])["lr"]
    lrs = {m: best.get(LR_FAMILY[m], args.default_lr) for m in METHODS}
    for item in args.lr:                                   # --lr ctr=1e-2 overrides
        m, v = item.split("=")
        lrs[m] = float(v)
    return lrs


def run_jobs(jobs, workers: int) -> None:
    """Run the callables in jobs, `workers` at a time (each one a single-threaded subprocess)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()                                      # re-raise a bug in this script


def run_all(args) -> None:
    results = load_results()
    results.setdefault("meta", {})
    results["meta"].update({"steps": args.steps, "sweep_steps": args.sweep_steps, "eval_examples": args.eval_examples,
                            "seeds": args.seeds, "sweep_lrs": args.sweep_lrs, "full_lrs": args.full_lrs,
                            "nproc": os.cpu_count(), "threads_per_process": args.threads, "workers": args.workers,
                            "adalora_lrs": args.adalora_lrs, "extra_sweep_lrs": args.extra_sweep_lrs})
    only = set(args.only) if args.only else {"sweep", "full", "main", "base"}
    # stage A: the sweep and the full fine-tuning reference (independent of each other)
    jobs = []
    if "full" in only:
        jobs += [lambda lr=lr: do_train(results, f"full/full-lr{lr:g}", "full", args.full_steps, lr, 0, args)
                 for lr in args.full_lrs]
    if "sweep" in only:
        for m in args.sweep_methods:
            lrs = args.sweep_lrs if m in ("lora", "ctr") else args.adalora_lrs
            jobs += [lambda m=m, lr=lr: do_train(results, f"sweep/{m}-lr{lr:g}", m, args.sweep_steps, lr, 0, args)
                     for lr in lrs]
    run_jobs(jobs, args.workers)
    fulls = [(k, r) for k, r in results["runs"].items() if k.startswith("full/") and not r["diverged"]]
    reference = RUNS / min(fulls, key=lambda kr: kr[1]["val_loss_end"])[0] if fulls else None
    results["meta"]["reference"] = str(reference.relative_to(ROOT)) if reference else None
    # stage B: evaluations of the base model and the reference, the main comparison (train + eval per job)
    jobs = []
    if "base" in only and ("base" not in results or args.force):
        def base_job():
            r = do_eval(None, reference, "base", args)
            with LOCK:
                results["base"] = r
                save_results(results)
        jobs.append(base_job)
    if reference is not None and ("full_eval" not in results or args.force):
        def full_job():
            r = do_eval(reference, None, "full", args)
            with LOCK:
                results["full_eval"] = r
                save_results(results)
        jobs.append(full_job)
    if "main" in only:
        lrs = chosen_lrs(results, args)
        results["meta"]["lrs"] = lrs
        print("learning rates of the main comparison:", lrs, flush=True)
        for seed in args.seeds:                             # seed-major: an interruption leaves whole seeds
            jobs += [lambda m=m, seed=seed: do_train(results, f"main/{m}-s{seed}", m, args.steps, lrs[m], seed, args,
                                                     evaluate_with=reference) for m in args.methods]
    with LOCK:
        save_results(results)
    run_jobs(jobs, args.workers)
    # stage C: diagnostic variants (seed 0) and extra stability points of the sweep
    if "main" in only:
        lrs = chosen_lrs(results, args)
        run_jobs([lambda v=v: do_train(results, f"main/{v}-s0", v, args.steps, lrs[LR_FAMILY[v]], 0, args,
                                       evaluate_with=reference) for v in args.variants], args.workers)
    if "sweep" in only:
        run_jobs([lambda m=m, lr=lr: do_train(results, f"sweep/{m}-lr{lr:g}", m, args.sweep_steps, lr, 0, args)
                  for lr in args.extra_sweep_lrs for m in ("lora", "ctr")], args.workers)
    with LOCK:
        save_results(results)


# ----------------------------------------------------------------------------------------------------------------
# report: figures and notes/experiments.md from the JSON
# ----------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mean_std(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    fmt = ((lambda v: f"{v:.3f}") if abs(m) < 10 else (lambda v: f"{v:.1f}") if abs(m) < 1000
           else (lambda v: f"{v:,.0f}"))
    return f"{fmt(m)} ± {fmt(s)}" if len(xs) > 1 else fmt(m)


def main_runs(results, method):
    return [r for k, r in sorted(results["runs"].items())
            if re.fullmatch(f"main/{re.escape(method)}-s\\d+", k) and r["returncode"] == 0]


def rose(r) -> str:
    """Did the training loss, after its first logged window, ever exceed that first value (a loss spike)?"""
    c = [l for _, l in r["curve"]]
    if len(c) < 2:
        return "–"
    later = max((l if math.isfinite(l) else float("inf")) for l in c[1:])
    return f"yes (to {later:.2f})" if later > c[0] else "no"


def plot_main_curves(results) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for m in METHODS + list(VARIANTS):
        runs = main_runs(results, m)
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["curve"]]
        curves = [[l for _, l in r["curve"]] for r in runs if len(r["curve"]) == len(steps)]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(steps))]
        line, = ax.plot(steps, mean, label=f"{NAMES[m]} (n={len(curves)})")
        ax.fill_between(steps, [min(c[i] for c in curves) for i in range(len(steps))],
                        [max(c[i] for c in curves) for i in range(len(steps))], color=line.get_color(), alpha=0.15)
    full = [r for k, r in results["runs"].items() if k == results["meta"].get("reference", "").replace(
        "runs/experiments/", "")]
    if full:
        ax.plot(*zip(*full[0]["curve"]), "k--", lw=1, label="full FT (reference)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (5-step window mean)")
    ax.set_title("WordNet demo task, SmolLM2-135M (mean, min–max over seeds)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT / "loss_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_sweep(results) -> Path:
    plt = _plt()
    fams = sorted({k.split("/")[1].split("-lr")[0] for k in results["runs"] if k.startswith("sweep/")},
                  key=METHODS.index)
    fig, axes = plt.subplots(1, len(fams), figsize=(3.3 * len(fams), 3.2), sharey=True, squeeze=False)
    all_lrs = sorted({r["lr"] for k, r in results["runs"].items() if k.startswith("sweep/")})
    color = {lr: plt.cm.viridis(i / max(len(all_lrs) - 1, 1)) for i, lr in enumerate(all_lrs)}   # one per lr
    for ax, fam in zip(axes[0], fams):
        runs = sorted([r for k, r in results["runs"].items() if k.startswith(f"sweep/{fam}-lr")], key=lambda r: r["lr"])
        for r in runs:
            pts = [(s, l if math.isfinite(l) else float("nan")) for s, l in r["curve"]]
            if pts:
                ax.plot(*zip(*pts), marker="x" if r["diverged"] else ".", color=color[r["lr"]],
                        label=f"lr {r['lr']:g}" + (" (diverged)" if r["diverged"] else ""))
        ax.set_yscale("log")
        ax.set_title(NAMES[fam], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    path = OUT / "lr_sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_heatmaps(results) -> list[tuple[str, Path, str]]:
    """Rank heatmaps of seed 0 through eval.py's own command line (the command is printed in the note)."""
    out = []
    for m in ("adalora", "triadapt", "ctr"):
        rec = results["runs"].get(f"main/{m}-s0", {})
        run = RUNS / rec.get("reused_from", f"main/{m}-s0")
        png = OUT / f"ranks_{m}.png"
        cmd = [PY, "eval.py", "--adapter", str(run.relative_to(ROOT)), "--rank-heatmap", str(png.relative_to(ROOT))]
        if adapter_config_file(run).is_file():
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        if png.is_file():
            out.append((m, png, " ".join([".venv/bin/python"] + cmd[1:])))
    return out


def write_report(results) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for r in results["runs"].values():                   # the criterion as this script states it now
        r["diverged"] = diverged(r)
    meta = results.get("meta", {})
    figs = {"curves": plot_main_curves(results)}
    if any(k.startswith("sweep/") for k in results["runs"]):
        figs["sweep"] = plot_sweep(results)
    heatmaps = plot_heatmaps(results)
    lrs = meta.get("lrs", {})
    L = []
    L.append("# Experiments: all methods on the demo task (CPU)\n")
    L.append(f"Everything below is generated from `notes/experiments/results.json` by {REPORT_COMMAND}; the runs "
             f"themselves by {COMMAND} (incremental: runs already in the JSON are skipped; run outputs in "
             "`runs/experiments/`). Only the *Discussion* section is written by hand.\n")
    dates = sorted(r["date"] for r in results["runs"].values() if "date" in r)
    L.append("## Setup\n")
    L.append(f"- Runs made {dates[0]} → {dates[-1]} (UTC) on the project's 2-core CPU machine (no GPU, fp32), "
             "**shared with other jobs**: the load average before/after each run is in the JSON.")
    L.append("- Model: embedded SmolLM2-135M-Instruct. Task: WordNet categories (`data/README.md`), "
             f"train on `{TRAIN_DATA}`, batch 8, seq-len 256, AdamW, clip 1.0, 10 warm-up steps, cosine to 0.1×lr.")
    L.append(f"- Main comparison: {meta.get('steps')} steps, seeds {meta.get('seeds')}; evaluation (eval.py) on the "
             f"first {meta.get('eval_examples')} examples of `{VAL_DATA}` (loss, exact match, KL to full FT) and "
             f"`{CHOICE_DATA}` (4-way multiple-choice accuracy by summed log-likelihood).")
    L.append("- Budget: every method `--rank 8` on all 7 linear types of all 30 layers (210 modules); see the "
             "parameter column. AdaLoRA/CTR-LoRA: r₀ = 12, global budget 8 × 210 triplets; TriAdaptLoRA: starts "
             "at rank 4, may grow to a total of 8 × 210; CG-LoRA: rank 8, `no-shift`, kfac-diag whitening. All "
             "other method hyper-parameters at train.py's defaults.")
    lr_txt = ", ".join(f"{NAMES[m]} {lrs[m]:g}" for m in METHODS if m in lrs)
    L.append(f"- Learning rates (peak): {lr_txt}. Chosen by the sweep below: for LoRA, AdaLoRA and CTR-LoRA the "
             f"lr with the lowest end-of-sweep validation loss among runs that did not diverge; TriAdaptLoRA and "
             "CG-LoRA (B·A-form factors like LoRA) take LoRA's. The sweep ran with seed 0 on a "
             f"coarse grid (LoRA/CTR-LoRA {meta.get('sweep_lrs')}, AdaLoRA {meta.get('adalora_lrs')}), so the choice "
             "is coarse; the lr each run used is in its row.")
    L.append(f"- Processes: train.py/eval.py with {meta.get('threads_per_process')} torch thread(s) each, "
             f"{meta.get('workers')} at a time (see the docstring of `run_measured` for why).")
    ref = meta.get("reference")
    if ref:
        rr = results["runs"][ref.replace("runs/experiments/", "")]
        others = [f"{r['lr']:g} (val loss {r['val_loss_end']:.3f})" for k, r in results["runs"].items()
                  if k.startswith("full/")]
        L.append(f"- KL reference: full fine-tuning (`--method full`), seed 0, {rr['steps']} steps, lr {rr['lr']:g} "
                 f"— the better of lr {', '.join(others)}. KL column = mean KL(p_full ‖ p_method) per target token "
                 "of the val file (eval.py `--reference`).")
    L.append("")

    # ---- main table
    L.append("## Main comparison (mean ± std over seeds)\n")
    L.append("| method | lr | seeds | trainable params at end | vs LoRA r=8 | val loss (train.py) | val loss (eval) | "
             "exact match | MC acc | KL to full FT | train loop s | process wall s | CPU s | peak RSS MiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in METHODS + list(VARIANTS):
        runs = main_runs(results, m)
        if not runs:
            continue
        ev = [r.get("eval", {}) for r in runs]
        params = [r["params"]["effective"] for r in runs if "params" in r]
        ratio = [r["params"]["effective"] / r["params"]["lora_r8"] for r in runs if "params" in r]
        L.append(f"| {NAMES[m]} | {runs[0]['lr']:g} | {len(runs)} | {mean_std(params)} | "
                 f"{mean_std(ratio)} | {mean_std([r['val_loss_end'] for r in runs])} | "
                 f"{mean_std([e.get('val_loss') for e in ev])} | {mean_std([e.get('exact_match') for e in ev])} | "
                 f"{mean_std([e.get('choice_acc') for e in ev])} | {mean_std([e.get('kl_to_full') for e in ev])} | "
                 f"{mean_std([r['train_loop_s'] for r in runs])} | {mean_std([r['process_wall_s'] for r in runs])} | "
                 f"{mean_std([r.get('cpu_s') for r in runs])} | {mean_std([r.get('peak_rss_mib') for r in runs])} |")
    base, fe = results.get("base"), results.get("full_eval")
    if fe and ref:
        rr = results["runs"][ref.replace("runs/experiments/", "")]
        L.append(f"| full FT (reference) | {rr['lr']:g} | 1 | {rr['initial_trainable']:,} | – | "
                 f"{rr['val_loss_end']:.3f} | {fe['val_loss']:.3f} | {fe['exact_match']:.3f} | {fe['choice_acc']:.3f} | "
                 f"0 | {rr['train_loop_s']:.0f} | {rr['process_wall_s']:.0f} | {rr.get('cpu_s', 0):.0f} | "
                 f"{rr.get('peak_rss_mib', 0):.0f} |")
    if base:
        kl = f"{base['kl_to_full']:.3f}" if base.get("kl_to_full") is not None else "–"
        L.append(f"| base model (no tuning) | – | – | 0 | – | – | {base['val_loss']:.3f} | {base['exact_match']:.3f} | "
                 f"{base['choice_acc']:.3f} | {kl} | – | – | – | – |")
    L.append("")
    L.append("Columns: *trainable params at end* counts the final adapter (SVD-form methods: active triplets × "
             "(d_in + d_out + 1); TriAdaptLoRA: every tensor of the grown adapter); *val loss (train.py)* is the "
             f"end-of-run validation loss train.py logs on the first {meta.get('eval_examples')} val examples, "
             "*val loss (eval)* the same quantity recomputed by eval.py; *exact match*: greedy completion equals "
             "the target + EOS; *MC acc*: multiple choice by summed log-likelihood; *train loop s*: train.py's own "
             "timer (after model load and CG calibration); *process wall s*: the whole train.py process; "
             "*CPU s*: user + system time of that process (less sensitive to other jobs than wall time, but not "
             "immune); *peak RSS*: maximum resident set size of the train.py process.\n")
    L.append("Per-run parameter counts (seed 0): " + "; ".join(
        f"{NAMES[m]} {main_runs(results, m)[0]['params']['effective']:,} (rank sum "
        f"{main_runs(results, m)[0]['params']['rank_sum']}, per-module {main_runs(results, m)[0]['params']['rank_min']}"
        f"–{main_runs(results, m)[0]['params']['rank_max']}; at start {main_runs(results, m)[0]['initial_trainable']:,})"
        for m in METHODS if main_runs(results, m) and "params" in main_runs(results, m)[0]) + ".\n")
    L.append("Per-seed values:\n")
    L.append("| run | val loss | exact match | MC acc | KL to full | process wall s | load before→after |")
    L.append("|---|---|---|---|---|---|---|")
    for k, r in sorted(results["runs"].items()):
        if k.startswith("main/") and r["returncode"] == 0:
            e = r.get("eval", {})
            f3 = lambda v: f"{v:.3f}" if v is not None else "–"
            L.append(f"| {k[5:]} | {f3(r['val_loss_end'])} | {f3(e.get('exact_match'))} | {f3(e.get('choice_acc'))} | "
                     f"{f3(e.get('kl_to_full'))} | {r['process_wall_s']:.0f} | {r['load_before']}→{r['load_after']} |")
    failed = [k for k, r in results["runs"].items() if k.startswith("main/") and r["returncode"] != 0]
    if failed:
        L.append(f"\nFailed runs (non-zero exit): {', '.join(failed)} — logs in `runs/experiments/logs/`.")
    L.append("")
    L.append(f"![loss curves](experiments/{figs['curves'].name})\n")
    L.append(f"Figure: training loss per step, mean over seeds with the min–max band. Regenerate: {REPORT_COMMAND} "
             "(drawn from each run's `metrics.jsonl`; one run alone: `.venv/bin/python eval.py --plot-metrics "
             "runs/experiments/main/lora-s0 runs/experiments/main/ctr-s0 --plot-out curves.png`).\n")

    # ---- sweep
    if "sweep" in figs:
        L.append("## Learning-rate sweep (stability)\n")
        L.append(f"Seed 0, {meta.get('sweep_steps')} steps, same settings otherwise. *Diverged* = the process "
                 "aborted, a step was skipped for a non-finite loss (train.py logs and counts these), the "
                 "end-of-run validation loss was not below the step-0 validation loss, or the training loss "
                 "(5-step window mean) rose above that step-0 loss of the untuned model at some point.\n")
        L.append("| method | lr | first logged train loss | peak train loss | final train loss | val loss start → end | "
                 "NaN/inf steps skipped | loss rose above its first value | diverged |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for k, r in sorted(results["runs"].items(), key=lambda kr: (METHODS.index(kr[1]["method"]) if kr[1]["method"]
                                                                    in METHODS else 9, kr[1]["lr"])):
            if not k.startswith("sweep/"):
                continue
            f3 = lambda v: f"{v:.3f}" if v is not None and math.isfinite(v) else str(v)
            L.append(f"| {NAMES[r['method']]} | {r['lr']:g} | {f3(r['train_loss_first'])} | {f3(r['train_loss_peak'])} | "
                     f"{f3(r['train_loss_final'])} | {f3(r['val_loss_start'])} → {f3(r['val_loss_end'])} | "
                     f"{r['nonfinite_steps']} | {rose(r)} | {'**yes**' if r['diverged'] else 'no'} |")
        L.append("")
        L.append(f"![lr sweep](experiments/{figs['sweep'].name})\n")
        L.append(f"Figure: training loss of every sweep run. Regenerate: {REPORT_COMMAND}.\n")

    # ---- heatmaps
    if heatmaps:
        L.append("## Final rank allocation (seed 0)\n")
        L.append("Ranks in use at the end of the run per layer × module type (AdaLoRA/CTR-LoRA: active triplets "
                 "out of r₀ = 12; TriAdaptLoRA: grown rank, from 4).\n")
        for m, png, cmd in heatmaps:
            L.append(f"![{NAMES[m]} ranks](experiments/{png.name})\n")
            L.append(f"{NAMES[m]}. Regenerate: `{cmd}`\n")

    # ---- discussion (kept from the existing note)
    old = NOTE.read_text() if NOTE.is_file() else ""
    m = re.search(r"<!-- discussion:begin -->.*?<!-- discussion:end -->", old, re.S)
    L.append("## Discussion\n")
    L.append(m.group(0) if m else "<!-- discussion:begin -->\n(to be written from the tables above)\n"
                                  "<!-- discussion:end -->")
    L.append("")
    NOTE.write_text("\n".join(L))
    print(f"wrote {NOTE} and {', '.join(str(p.relative_to(ROOT)) for p in OUT.glob('*.png'))}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only rewrite the note and figures from the JSON")
    ap.add_argument("--only", nargs="*", choices=["sweep", "full", "base", "main"], help="phases to run")
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS, help="methods of the main comparison")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20, help="steps of the main comparison (and of the sweep twins)")
    ap.add_argument("--sweep-steps", type=int, default=20)
    ap.add_argument("--sweep-methods", nargs="*", default=["lora", "adalora", "ctr"], choices=METHODS)
    ap.add_argument("--sweep-lrs", nargs="*", type=float, default=[1e-3, 1e-2, 1e-1],
                    help="learning rates of the LoRA and CTR-LoRA sweep")
    ap.add_argument("--variants", nargs="*", default=["cg-shift"], choices=list(VARIANTS),
                    help="diagnostic variants run with seed 0 after the main comparison")
    ap.add_argument("--extra-sweep-lrs", nargs="*", type=float, default=[3e-2],
                    help="LoRA/CTR-LoRA stability points run after the main comparison (they choose nothing)")
    ap.add_argument("--adalora-lrs", nargs="*", type=float, default=[1e-2],
                    help="learning rates of the AdaLoRA sweep (shorter: time)")
    ap.add_argument("--full-lrs", nargs="*", type=float, default=[5e-5])
    ap.add_argument("--full-steps", type=int, default=40, help="steps of the full fine-tuning reference")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each train.py/eval.py process")
    ap.add_argument("--workers", type=int, default=2, help="processes at a time")
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--default-lr", type=float, default=1e-3, help="lr of a method whose family has no sweep yet")
    ap.add_argument("--lr", nargs="*", default=[], help="per-method overrides, e.g. --lr ctr=1e-2")
    ap.add_argument("--force", action="store_true", help="redo selected runs even if the JSON holds them")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if not args.report:
        run_all(args)
    write_report(load_results())


if __name__ == "__main__":
    main()
