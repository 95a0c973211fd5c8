"""
The generated part of notes/experiments.md and its figures, from the records that
scripts/experiments.py saved (notes/experiments/results/*.json); nothing else is read, so the note
can be regenerated after the run folders are gone:

    python scripts/experiments.py --report

The note keeps everything outside the markers <!-- generated:begin --> ... <!-- generated:end -->
(the protocol above them and the hand-written discussion below). Every number between them comes
from the records; where a run is missing, its cell says so.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import textwrap
import time
from pathlib import Path

import experiments as X

BEGIN = "<!-- generated:begin -->"
END = "<!-- generated:end -->"
# two-sided 95 % quantiles of Student's t, by degrees of freedom (n - 1 paired differences)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
# (label, split, field, higher is better) of the evaluation tables
METRICS = [("loss", "test", "loss", False), ("exact match", "test", "exact_match", True),
           ("MC acc", "test_choice", "acc", True), ("KL to full FT", "test", "kl_to_reference",
                                                    False)]
OOD_METRICS = [("loss", "ood", "loss", False), ("exact match", "ood", "exact_match", True),
               ("MC acc", "ood_choice", "acc", True), ("KL to full FT", "ood", "kl_to_reference",
                                                       False)]


# ------------------------------------------------------------------------------------------------
# statistics and formatting
# ------------------------------------------------------------------------------------------------


def t_quantile(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)] if df >= 1 else math.nan


def t_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95 % t-interval of paired differences: mean ± t(0.975, n-1) · sd / √n."""
    if len(diffs) < 2:
        return None
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t_quantile(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return m, m - half, m + half


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def mean_std(xs, digits: int = 3) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "–"
    m = statistics.mean(xs)
    if len(xs) == 1:
        return fmt(xs[0], digits)
    sd = statistics.stdev(xs)
    if abs(m) >= 1000:
        return f"{m:,.0f} ± {sd:,.0f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def interval(diffs: list[float], digits: int = 3) -> str:
    ci = t_interval(diffs)
    if ci is None:
        return "–" if not diffs else f"{diffs[0]:+.{digits}f} (n=1)"
    m, lo, hi = ci
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (n={len(diffs)})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def lr_text(lr) -> str:
    return f"{lr:g}" if lr else "–"


# ------------------------------------------------------------------------------------------------
# reading the records
# ------------------------------------------------------------------------------------------------


class Records:
    """The records with the settings they were made with, and the protocol's decisions."""

    def __init__(self, results: dict, args):
        self.results = results
        saved = results.get("settings", {}).get("args", {})
        self.args = argparse.Namespace(**{**vars(args), **saved})
        self.d = X.decisions(results, self.args)
        self.l0 = self.d["untuned_dev_loss"]
        ref = self.d["lr"].get("full")
        self.reference = X.train_job("full", ref, 0, self.args.steps, "").key if ref else None

    def train(self, variant, lr, seeds=None, steps=None) -> dict[int, dict]:
        """seed -> finished record of variant at lr (--steps unless given)."""
        if not lr:
            return {}
        steps = steps or self.args.steps
        out = {}
        for s in (seeds if seeds is not None else self.args.seeds):
            rec = self.results.get(X.train_job(variant, lr, s, steps, "").key)
            if X.finished(rec):
                out[s] = rec
        return out

    def evaluation(self, rec: dict) -> dict:
        key = X.train_job(rec["variant"], rec["lr"], rec["seed"], rec["steps"], "").key
        e = self.results.get("eval/" + key)
        return e.get("splits", {}) if e and e.get("status") == "ok" else {}

    def value(self, rec: dict, split: str, name: str):
        return self.evaluation(rec).get(split, {}).get(name)

    def untuned_splits(self) -> dict:
        """The untuned model's evaluation: the one with the KL reference when it has run."""
        for key in ("eval/base", "base"):
            rec = self.results.get(key)
            if rec and rec.get("status") == "ok":
                return rec["splits"]
        return {}

    def diverged(self, rec) -> bool | None:
        return X.diverged(rec, self.l0) if self.l0 is not None else None


def peak_window(rec: dict) -> float | None:
    """Highest mean training loss over X.WINDOW consecutive steps after the warm-up."""
    losses = [loss for step, loss in rec.get("curve", []) if step > X.WINDOW]
    if len(losses) < X.WINDOW:
        return None
    return max(sum(losses[i:i + X.WINDOW]) / X.WINDOW for i in range(len(losses) - X.WINDOW + 1))


def mean_of(rec: dict, key: str) -> float | None:
    xs = [x for x in rec.get(key) or [] if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.mean(xs) if xs else None


def step_seconds(rec: dict) -> float | None:
    return rec["train_loop_s"] / rec["steps"] if rec.get("train_loop_s") else None


def paired(rs: Records, a: dict[int, dict], b: dict[int, dict], split: str, name: str,
           value=None) -> list[float]:
    """Differences a - b of one metric over the seeds both have."""
    get = value or (lambda rec: rs.value(rec, split, name))
    out = []
    for s in sorted(set(a) & set(b)):
        va, vb = get(a[s]), get(b[s])
        if va is not None and vb is not None and math.isfinite(va) and math.isfinite(vb):
            out.append(va - vb)
    return out


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


def compute_section(rs: Records) -> list[str]:
    recs = [r for k, r in rs.results.items() if k != "settings" and "process_wall_s" in r]
    if not recs:
        return ["No runs yet: this section and the tables below fill in when "
                "`python scripts/experiments.py` has run.", ""]
    by_kind = {}
    for r in recs:
        by_kind.setdefault(r["kind"], []).append(r["process_wall_s"])
    spans = sorted((r["started"], r["ended"]) for r in recs if r.get("started"))
    busy, cur = 0.0, None                    # wall time during which at least one run went on
    for s, e in spans:
        if cur is None or s > cur[1]:
            busy += (cur[1] - cur[0]) if cur else 0.0
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    busy += (cur[1] - cur[0]) if cur else 0.0
    loads = [r["load_mean"] for r in recs if r.get("load_mean") is not None]
    first = time.strftime("%Y-%m-%d %H:%M", time.gmtime(spans[0][0])) if spans else "?"
    last = time.strftime("%Y-%m-%d %H:%M", time.gmtime(spans[-1][1])) if spans else "?"
    total = sum(sum(v) for v in by_kind.values())
    parts = ", ".join(f"{len(v)} {k} ({sum(v) / 3600:.2f} h)" for k, v in sorted(by_kind.items()))
    failed = [k for k, r in rs.results.items() if r.get("status") in ("failed", "interrupted")]
    lines = [f"**Compute.** {len(recs)} runs: {parts}. Total compute time "
             f"{total / 3600:.2f} process-hours (the sum of every run's wall time); "
             f"{busy / 3600:.2f} h of wall-clock time with at least one run going, "
             f"{first} → {last} UTC. Each process used {rs.args.threads} thread(s), "
             f"{rs.args.workers} at a time (the bench alone)."]
    if loads:
        highest = max(r.get("load_max") or 0 for r in recs)
        lines.append(f"The machine's 1-minute load average during the runs: mean "
                     f"{statistics.mean(loads):.2f}, highest {highest:.2f} "
                     f"({os.cpu_count()} cores here; 2 one-thread runs alone make about 2). "
                     "Each record holds its own load (before, after, mean and highest during "
                     "it).")
    commits = collections.Counter(r.get("commit") or "not recorded" for r in recs)
    lines.append("Code of the runs (commit: runs): " + ", ".join(
        f"{c}: {n}" for c, n in sorted(commits.items())) + ".")
    if failed:
        lines.append(f"Runs that failed or were interrupted (rerun by the next invocation): "
                     f"{', '.join(failed)}.")
    return [" ".join(lines), ""]


def settings_section(rs: Records) -> list[str]:
    a = rs.args
    protocol = X.parse_args([])
    keys = ["methods", "seeds", "steps", "grid_steps", "grid_seeds", "full_grid_seeds",
            "div_seeds", "eval_examples", "workers", "threads", "bench_workload", "bench_rounds"]
    off = [f"{k} = {getattr(a, k)} (protocol: {getattr(protocol, k)})" for k in keys
           if getattr(a, k) != getattr(protocol, k)]
    ran = any(r.get("kind") == "train" for r in rs.results.values())
    line = (f"**Settings {'of these runs' if ran else '(the protocol’s; nothing has run yet)'}.** "
            f"Methods {', '.join(a.methods)}; seeds {a.seeds}, "
            f"{a.steps} steps; lr ladders on dev with seeds {a.grid_seeds} (full fine-tuning "
            f"{a.full_grid_seeds}), {a.grid_steps} steps; controls at the lr where LoRA diverges "
            f"with seeds {a.div_seeds}; evaluation on "
            f"{'all' if not a.eval_examples else f'the first {a.eval_examples}'} examples of each "
            "file.")
    out = [line + (" **Not the protocol's settings:** " + "; ".join(off) + "." if off else ""),
           ""]
    if rs.l0 is not None:
        base = rs.results["base"]["splits"]
        out += [f"Untuned model: dev loss L0 = {rs.l0:.3f} (the anchor of *diverged*); test loss "
                f"{fmt(base['test'].get('loss'))}, exact match "
                f"{fmt(base['test'].get('exact_match'))}, MC acc "
                f"{fmt(base['test_choice'].get('acc'))}; OOD loss {fmt(base['ood'].get('loss'))}, "
                f"exact match {fmt(base['ood'].get('exact_match'))}, MC acc "
                f"{fmt(base['ood_choice'].get('acc'))}.", ""]
    return out


def ladder_section(rs: Records, figs: dict) -> list[str]:
    out = ["### Learning rates on the dev split (and the stability ladder)", ""]
    ladders = rs.d["ladders"]
    if not any(rs.results.get(X.train_job(v, lr, s, rs.args.grid_steps, "").key)
               for v, lad in ladders.items() for lr in lad.levels for s in rs.args.grid_seeds):
        return out + ["(no ladder runs yet)", ""]
    lrs = sorted({lr for lad in ladders.values() for lr in lad.levels})
    rows = []
    for v, lad in ladders.items():
        seeds = rs.args.full_grid_seeds if v == "full" else rs.args.grid_seeds
        cells = []
        for lr in lrs:
            recs = [rs.results.get(X.train_job(v, lr, s, rs.args.grid_steps, "").key)
                    for s in seeds]
            done = [r for r in recs if X.finished(r)]
            if lr not in lad.levels or not done:
                cells.append("" if lr not in lad.levels else "…")
                continue
            n_div = sum(bool(rs.diverged(r)) for r in done)
            ends = [r.get("dev_loss_end") for r in done]
            txt = mean_std(ends)
            if n_div:
                txt = f"{txt} **div {n_div}/{len(done)}**"
            cells.append(f"**{txt}**" if lr == lad.chosen and lad.complete else txt)
        highest_ok = max((lr for lr in lad.levels if lad.first_divergent is None
                          or lr < lad.first_divergent), default=None)
        rows.append([X.NAMES[v]] + cells + [
            lr_text(lad.chosen) if lad.complete else "(open)",
            lr_text(highest_ok) + (" (cap)" if lad.first_divergent is None and lad.complete
                                   and v in X.STABILITY_LADDERS else ""),
            lr_text(lad.first_divergent)])
    out += table(["variant"] + [f"{lr:g}" for lr in lrs]
                 + ["chosen lr", "highest lr, no seed diverged", "lowest lr, a seed diverged"],
                 rows)
    out.append(f"Cells: final dev loss after {rs.args.grid_steps} steps, mean ± std over the "
               f"seeds ({rs.args.grid_seeds}; full FT {rs.args.full_grid_seeds}); **div k/n**: "
               "k of n seeds diverged; bold: the chosen lr; …: running or not run yet. A ladder "
               "marked (open) is still waiting for runs. `(cap)`: never diverged up to the "
               "ladder's highest lr.")
    out.append("")
    if "ladder" in figs:
        out += [f"![lr ladders]({figs['ladder']})", "",
                "Figure: final dev loss against the learning rate (mean over seeds; × marks a "
                "level where a seed diverged, drawn at the top). Regenerate: "
                "`python scripts/experiments.py --report`.", ""]
    ctr = ladders.get("ctr")
    if ctr:
        rows = []
        for v in ("ctr", "ctr-notr"):
            if v not in ladders:
                continue
            for lr in ladders[v].levels:
                recs = [r for s in rs.args.grid_seeds if X.finished(r := rs.results.get(
                    X.train_job(v, lr, s, rs.args.grid_steps, "").key))]
                if not recs:
                    continue
                rows.append([X.NAMES[v], f"{lr:g}", f"{sum(bool(rs.diverged(r)) for r in recs)}"
                             f"/{len(recs)}", mean_std([mean_of(r, "clip_rate") for r in recs]),
                             mean_std([mean_of(r, "kl") for r in recs], 4),
                             fmt(max((max(r.get("kl_max") or [0]) for r in recs), default=None),
                                 4), mean_std([peak_window(r) for r in recs])])
        if rows:
            out += ["CTR-LoRA's trust region along its ladder (every step logged):", ""]
            out += table(["variant", "lr", "diverged", "share of steps shrunk",
                          "measured KL per step, mean", "largest step KL", "peak 10-step "
                          "training loss"], rows)
            out += ["The measured KL is KL(p_before ‖ p_after) of each applied step over its "
                    "batch's label tokens (`kl`, `kl_max` in metrics.jsonl); the radius ρ is "
                    "train.py's default. Without the trust region nothing is measured (0).", ""]
            if "ctr_kl" in figs:
                out += [f"![CTR-LoRA per-step KL]({figs['ctr_kl']})", "",
                        "Figure: CTR-LoRA's measured per-step KL and step shrink factor, seed "
                        f"{rs.args.grid_seeds[0]} of each ladder level.", ""]
    return out


def method_rows(rs: Records, variants, metrics) -> list[list[str]]:
    rows = []
    for v, lr, label in variants:
        recs = rs.train(v, lr)
        if not recs:
            rows.append([label, lr_text(lr), "0"] + ["–"] * (len(metrics) + 3))
            continue
        vals = list(recs.values())
        start = [r.get("params_start") for r in vals]
        end = [r.get("params_end") for r in vals]
        n_div = sum(bool(rs.diverged(r)) for r in vals)
        rows.append([label, lr_text(lr), str(len(vals)),
                     f"{fmt(start[0])} → {mean_std(end)}"]
                    + [mean_std([rs.value(r, s, n) for r in vals]) for _, s, n, _ in metrics]
                    + [mean_std([r.get("update_norm") for r in vals]), f"{n_div}/{len(vals)}"])
    return rows


def main_sections(rs: Records, figs: dict) -> list[str]:
    methods = [m for m in X.METHODS if m in rs.args.methods]
    variants = [(m, rs.d["lr"].get(m), X.NAMES[m]) for m in methods]
    head = ["method", "lr", "seeds", "params start → end"]
    out = []
    for title, metrics in (("In-distribution test (`data/wordnet_val*.jsonl`)", METRICS),
                           ("Out of distribution: held-out categories "
                            "(`data/wordnet_ood*.jsonl`)", OOD_METRICS)):
        out += [f"### {title}", ""]
        rows = method_rows(rs, variants, metrics)
        full_lr = rs.d["lr"].get("full")
        for seed, label in ((0, "full FT (the KL reference)"), (1, "full FT, seed 1 (KL floor)")):
            recs = rs.train("full", full_lr, [seed])
            if recs:
                r = recs[seed]
                rows.append([label, lr_text(full_lr), "1", fmt(r.get("params_start"))]
                            + [fmt(rs.value(r, s, n)) for _, s, n, _ in metrics]
                            + [fmt(r.get("update_norm")), "–"])
        base = rs.untuned_splits()
        if base:
            rows.append(["untuned model", "–", "–", "0"]
                        + [fmt(base.get(s, {}).get(n)) for _, s, n, _ in metrics] + ["0", "–"])
        out += table(head + [m[0] for m in metrics] + ["‖ΔW‖/‖W0‖", "diverged"], rows)
    out += ["Mean ± std over seeds. *params start → end*: trainable parameters when training "
            "starts (train.py) and in the final adapter (AdaLoRA/CTR-LoRA: active triplets × "
            "(d_in + d_out + 1); TriAdaptLoRA: the grown blocks and cores); *exact match*: the "
            "greedy completion equals the label and stops; *MC acc*: 4-way multiple choice by "
            "summed log-likelihood; *KL to full FT*: mean KL(p_full ‖ p_method) per target token "
            "(eval.py --reference), against the full fine-tuning run of seed 0 — the seed-1 row "
            "is how far two full fine-tuning runs are from each other; *‖ΔW‖/‖W0‖*: size of the "
            "update over all adapted linears.", ""]
    lora = rs.train("lora", rs.d["lr"].get("lora"))
    rows = []
    for m in methods:
        if m == "lora":
            continue
        recs = rs.train(m, rs.d["lr"].get(m))
        rows.append([f"{X.NAMES[m]} − LoRA"] + [interval(paired(rs, recs, lora, s, n))
                                                 for _, s, n, _ in METRICS + OOD_METRICS])
    out += ["### Paired differences to LoRA (same seeds)", ""]
    out += table(["difference"] + [f"test {m[0]}" for m in METRICS]
                 + [f"OOD {m[0]}" for m in OOD_METRICS], rows)
    out += ["Mean difference over the seeds both runs have, with its 95 % confidence interval "
            "[mean ± t(0.975, n−1) · sd / √n] (a t-interval over the n paired differences). "
            "Same seed = same data order and the same adapter initialization stream; each "
            "method at its own chosen lr. Lower is better for loss and KL, higher for exact "
            "match and MC acc.", ""]
    if "curves" in figs:
        out += [f"![loss curves]({figs['curves']})", "",
                "Figure: training loss per step (10-step moving mean; mean over seeds with the "
                "min–max band), each method at its chosen lr; dashed: full fine-tuning.", ""]
    heat = [m for m in ("adalora", "triadapt", "ctr") if f"ranks_{m}" in figs]
    if heat:
        out += ["### Final rank allocation (seed 0)", ""]
        for m in heat:
            out += [f"![{X.NAMES[m]} ranks]({figs[f'ranks_{m}']})", ""]
        out += ["Ranks in use at the end per layer × module type (AdaLoRA/CTR-LoRA: active "
                "triplets out of r₀ = 12; TriAdaptLoRA: grown rank, from 4).", ""]
    return out


def control_sections(rs: Records) -> list[str]:
    lr, out = rs.d["lr"], ["### Controls", ""]
    if not any(rs.train(v, lr.get(b)) for v, b in (("ctr-notr", "ctr"), ("cg-identity", "cg"),
                                                  ("triadapt-noorth", "triadapt"))):
        return out + ["(no control runs yet)", ""]
    ctr = lr.get("ctr")
    if ctr:
        group = [("adalora", ctr, f"AdaLoRA at CTR-LoRA's lr"), ("ctr", ctr, "CTR-LoRA"),
                 ("ctr-notr", ctr, X.NAMES["ctr-notr"])]
        out += [f"**Trust region at CTR-LoRA's lr ({ctr:g}).**", ""]
        out += control_table(rs, group)
        c, a, n = (rs.train(v, ctr) for v in ("ctr", "adalora", "ctr-notr"))
        out += paired_lines(rs, [("CTR-LoRA − no trust region", c, n),
                                 ("CTR-LoRA − AdaLoRA", c, a)])
    div = rs.d["lr_lora_diverges"]
    if ctr and div:
        group = [(v, div, X.NAMES[v]) for v in ("lora", "adalora", "ctr", "ctr-notr")]
        out += [f"**At the lowest lr where LoRA diverged on the ladder ({div:g}), "
                f"{rs.args.steps} steps, seeds {rs.args.div_seeds}.**", ""]
        out += control_table(rs, group, seeds=rs.args.div_seeds)
        out += ["These runs are not evaluated on test and OOD (their question is divergence: "
                "the dev loss answers it) unless they are also main runs.", ""]
    if lr.get("cg"):
        group = [("cg", lr["cg"], "CG-LoRA (kfac-diag whitening)"),
                 ("cg-identity", lr["cg"], X.NAMES["cg-identity"]),
                 ("lora", lr.get("lora"), "LoRA (its own lr)")]
        out += [f"**Curvature whitening of CG-LoRA's initialization (lr {lr['cg']:g}).**", ""]
        out += control_table(rs, group)
        c, i, l = rs.train("cg", lr["cg"]), rs.train("cg-identity", lr["cg"]), rs.train(
            "lora", lr.get("lora"))
        out += paired_lines(rs, [("CG-LoRA − identity curvature", c, i),
                                 ("CG-LoRA − LoRA", c, l), ("identity curvature − LoRA", i, l)])
        inits = [(X.NAMES[v], [r["calibration"].get("cg_init_s") for r in rs.train(
            v, lr["cg"]).values() if r.get("calibration")]) for v in ("cg", "cg-identity")]
        out += ["Initialization (calibration) time, s: " + "; ".join(
            f"{name} {mean_std(xs, 1)}" for name, xs in inits) + ".", ""]
    if lr.get("triadapt"):
        group = [("triadapt", lr["triadapt"], "TriAdaptLoRA (--orth-reg 0.1)"),
                 ("triadapt-noorth", lr["triadapt"], X.NAMES["triadapt-noorth"])]
        out += [f"**TriAdaptLoRA's orthogonality penalty (lr {lr['triadapt']:g}).**", ""]
        out += control_table(rs, group)
        out += paired_lines(rs, [("with penalty − without", rs.train("triadapt", lr["triadapt"]),
                                  rs.train("triadapt-noorth", lr["triadapt"]))],
                            extra=("‖ΔW‖/‖W0‖", lambda r: r.get("update_norm")))
    return out


def control_table(rs: Records, group, seeds=None) -> list[str]:
    rows = []
    for v, lr, label in group:
        recs = list(rs.train(v, lr, seeds).values())
        if not recs:
            rows.append([label, lr_text(lr), "0"] + ["–"] * 9)
            continue
        rows.append([label, lr_text(lr), str(len(recs)),
                     f"{sum(bool(rs.diverged(r)) for r in recs)}/{len(recs)}",
                     mean_std([peak_window(r) for r in recs]),
                     mean_std([r.get("dev_loss_start") for r in recs]),
                     mean_std([r.get("dev_loss_end") for r in recs])]
                    + [mean_std([rs.value(r, s, n) for r in recs]) for s, n in
                       (("test", "loss"), ("test", "kl_to_reference"), ("ood", "loss"))]
                    + [mean_std([r.get("update_norm") for r in recs]),
                       mean_std([mean_of(r, "clip_rate") for r in recs]) if v.startswith("ctr")
                       else "–"])
    return table(["run", "lr", "seeds", "diverged", "peak 10-step train loss", "dev loss step 0",
                  "dev loss end", "test loss", "test KL to full FT", "OOD loss", "‖ΔW‖/‖W0‖",
                  "steps shrunk"], rows)


def paired_lines(rs: Records, pairs, extra=None) -> list[str]:
    cols = [("test loss", "test", "loss"), ("test KL", "test", "kl_to_reference"),
            ("OOD loss", "ood", "loss"), ("OOD MC acc", "ood_choice", "acc")]
    rows = []
    for label, a, b in pairs:
        row = [label] + [interval(paired(rs, a, b, s, n)) for _, s, n in cols]
        if extra:
            row.append(interval(paired(rs, a, b, "", "", extra[1])))
        rows.append(row)
    return table(["paired difference"] + [c[0] for c in cols] + ([extra[0]] if extra else []),
                 rows)


def efficiency_section(rs: Records) -> list[str]:
    out = ["### Efficiency", ""]
    bench = rs.results.get("bench")
    if bench and bench.get("status") == "ok":
        setups, a = bench["setups"], bench.get("args", {})
        lora = (setups.get("ours-lora") or {}).get("step_s")
        rows = []
        for s in sorted(setups, key=lambda x: X.BENCH_SETUPS.index(x) if x in X.BENCH_SETUPS
                        else len(X.BENCH_SETUPS)):
            v = setups[s]
            if s.startswith("paired-"):
                continue
            rows.append([s, fmt(v.get("step_s"), 3), fmt(lora and v.get("step_s") and
                                                         v["step_s"] / lora, 3),
                         fmt(v.get("peak_mib"), 0), f"{v.get('others_share_max', 0):.0%}"])
        out += [f"`benchmarks/bench_vs_peft.py` on {bench['workload']}: batch {a.get('batch')} × "
                f"{a.get('seq')} tokens, rank 8, {a.get('threads')} thread(s), "
                f"{a.get('rounds')} rounds, setups in separate processes alternating round by "
                f"round (median over rounds); load average {bench.get('load_before')} before, "
                f"mean {bench.get('load_mean')} during it.", ""]
        out += table(["setup", "median s/step", "/ ours-lora", "peak MiB (over imports)",
                      "others' CPU share, worst"], rows)
        prs = [[s, fmt(statistics.median(v["pair_ratios"]), 3),
                f"{min(v['pair_ratios']):.3f}–{max(v['pair_ratios']):.3f}",
                str(len(v["pair_ratios"]))]
               for s, v in setups.items() if s.startswith("paired-") and v.get("pair_ratios")]
        if prs:
            out += ["Paired step-time ratios (the method and our LoRA in one process, steps "
                    "alternating: machine drift cancels):", ""]
            out += table(["setup", "median ratio to LoRA", "range", "pairs"], prs)
    else:
        out += ["(the bench has not run yet: it runs last, alone)", ""]
    rows = []
    for v in [m for m in X.METHODS if m in rs.args.methods] + ["full"]:
        recs = list(rs.train(v, rs.d["lr"].get(v), None if v != "full" else [0, 1]).values())
        if recs:
            rows.append([X.NAMES[v], mean_std([step_seconds(r) for r in recs], 3),
                         mean_std([r.get("peak_rss_mib") for r in recs], 0),
                         mean_std([r.get("cpu_s") for r in recs], 0),
                         mean_std([r.get("load_mean") for r in recs], 2)])
    if rows:
        out += [f"In the runs themselves ({rs.args.steps} steps, the task's batches of 8 short "
                f"sequences, {rs.args.workers} one-thread processes at a time, so not on an idle "
                "machine):", ""]
        out += table(["method", "s/step (train loop)", "peak RSS MiB (GNU time)",
                      "CPU s per run", "load average during the run"], rows)
    return out


def claims_section(rs: Records) -> list[str]:
    """Each paper claim, the number measured here, and a verdict by the stated rule."""
    lr, lad = rs.d["lr"], rs.d["ladders"]
    rows = []

    def ladder_limit(v):
        lv = lad.get(v)
        return (lv.first_divergent if lv and lv.complete else None), lv

    def ci_verdict(diffs, better_if_negative=True):
        ci = t_interval(diffs)
        if ci is None:
            return "–", "not measured yet"
        m, lo, hi = ci
        good = hi < 0 if better_if_negative else lo > 0
        return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]", "reproduced" if good else "not reproduced"

    # CTR-LoRA: stability
    def limit_text(v):
        lv = lad.get(v)
        if not lv or not lv.complete:
            return "not run"
        return f"{lv.first_divergent:g}" if lv.first_divergent else f"none up to {lv.levels[-1]:g}"

    (c_div, c_lad), (l_div, _), (a_div, a_lad) = (ladder_limit(v)
                                                   for v in ("ctr", "lora", "adalora"))
    if c_lad and c_lad.complete and l_div:
        num = ("lowest lr at which a seed diverged: " + ", ".join(
            f"{X.NAMES[v]} {limit_text(v)}" for v in ("ctr", "lora", "adalora")))
        better = c_div is None or (c_div > l_div and (a_div is None or c_div > a_div))
        rows.append(["CTR-LoRA: more stable than PEFT baselines", num,
                     "reproduced" if better else "not reproduced"])
    else:
        rows.append(["CTR-LoRA: more stable than PEFT baselines", "–", "not measured yet"])
    n_div, _ = ladder_limit("ctr-notr")
    if c_lad and c_lad.complete and "ctr-notr" in lad and lad["ctr-notr"].complete:
        rows.append(["… and its trust region is what makes it so",
                     f"lowest lr at which a seed diverged, with / without the trust region: "
                     f"{limit_text('ctr')} / {limit_text('ctr-notr')}",
                     "reproduced" if (c_div is None and n_div) or (c_div and n_div and
                                                                    c_div > n_div)
                     else "not reproduced"])
    bench = rs.results.get("bench", {}).get("setups", {})
    get = lambda setup, key: (bench.get(setup) or {}).get(key)
    mem = lambda setup: get(setup, "peak_mib")
    if all(get(s, "step_s") for s in ("ours-ctr", "peft-lora", "peft-adalora")):
        for claim, key, unit, digits in (("higher throughput", "step_s", "s/step", 3),
                                         ("less memory", "peak_mib", "peak MiB", 0)):
            v = {s: get(s, key) for s in ("ours-ctr", "peft-lora", "peft-adalora", "ours-lora")}
            better = v["ours-ctr"] < min(v["peft-lora"], v["peft-adalora"])   # lower is better
            rows.append([f"CTR-LoRA: {claim} than strong PEFT baselines",
                         f"{unit}: " + ", ".join(f"{s} {fmt(x, digits)}" for s, x in v.items()),
                         "reproduced" if better else "not reproduced"])
    else:
        rows += [["CTR-LoRA: higher throughput / less memory than PEFT baselines", "–",
                  "not measured yet"]]
    lora, ctr = rs.train("lora", lr.get("lora")), rs.train("ctr", lr.get("ctr"))
    for split, name, label in (("test_choice", "acc", "in distribution"),
                               ("ood_choice", "acc", "out of distribution")):
        num, verdict = ci_verdict(paired(rs, ctr, lora, split, name), better_if_negative=False)
        rows.append([f"CTR-LoRA: better accuracy than LoRA {label}",
                     f"MC acc, CTR-LoRA − LoRA: {num}", verdict])
    pt, pa = (bench.get("paired-triadapt") or {}), (bench.get("paired-adalora") or {})
    if pt.get("pair_ratios") and pa.get("pair_ratios"):
        rt, ra = statistics.median(pt["pair_ratios"]), statistics.median(pa["pair_ratios"])
        rows.append(["TriAdaptLoRA: less overhead than AdaLoRA",
                     f"step time / LoRA's, paired: TriAdaptLoRA {rt:.3f}, AdaLoRA {ra:.3f}; "
                     f"peak MiB {fmt(mem('ours-triadapt'), 0)} vs {fmt(mem('ours-adalora'), 0)}",
                     "reproduced" if rt < ra else "not reproduced"])
    else:
        rows.append(["TriAdaptLoRA: less overhead than AdaLoRA", "–", "not measured yet"])
    tri, ada = rs.train("triadapt", lr.get("triadapt")), rs.train("adalora", lr.get("adalora"))
    num, verdict = ci_verdict(paired(rs, tri, ada, "test", "loss"))
    rows.append(["TriAdaptLoRA: better than AdaLoRA", f"test loss, TriAdaptLoRA − AdaLoRA: {num}",
                 verdict])
    cg = rs.train("cg", lr.get("cg"))
    num, verdict = ci_verdict(paired(rs, cg, lora, "test", "kl_to_reference"))
    rows.append(["CG-LoRA: predictions closer to full fine-tuning than LoRA",
                 f"test KL to full FT, CG-LoRA − LoRA: {num}", verdict])
    ident = rs.train("cg-identity", lr.get("cg"))
    num, verdict = ci_verdict(paired(rs, cg, ident, "test", "kl_to_reference"))
    rows.append(["… and closer than a plain gradient-SVD start (LoRA-GA/LoRA-One-like)",
                 f"test KL, CG-LoRA − identity curvature: {num}", verdict])
    rows += [["CG-LoRA: init 3.58 s / 510 MiB vs LoRA-GA 7.01 s / 1.28 GiB (RoBERTa-base)",
              "no LoRA-GA here; CG init times are in the controls", "not testable here"],
             ["CTR-LoRA / TriAdaptLoRA: results on 7B–13B models, GLUE, SQuAD, BoolQ, "
              "WinoGrande", "135M model, one WordNet task", "not testable here"]]
    out = ["### Paper claims", ""]
    out += table(["claim", "measured here", "verdict"], rows)
    out += ["Verdicts follow fixed rules, not judgement: a quality claim is *reproduced* when the "
            "95 % interval of the paired difference lies wholly on the claimed side; a stability "
            "claim when the method's lowest diverging lr on the ladder is higher than the "
            "baselines' (or it never diverged up to the cap); an efficiency claim when the "
            "measured median is better. Everything at this scale only (135M, CPU, one task).", ""]
    return out


def readme_section(rs: Records) -> list[str]:
    """A compact table and two sentences for the README, both from the records."""
    out = ["### For the README", ""]
    methods = [m for m in X.METHODS if m in rs.args.methods]
    lora = rs.train("lora", rs.d["lr"].get("lora"))
    rows, loss = [], {}
    for m in methods:
        recs = rs.train(m, rs.d["lr"].get(m))
        if not recs:
            continue
        vals = list(recs.values())
        loss[m] = [rs.value(r, "test", "loss") for r in vals]
        rows.append([X.NAMES[m], lr_text(rs.d["lr"][m]), mean_std([r.get("params_end")
                                                                   for r in vals]),
                     mean_std(loss[m]), mean_std([rs.value(r, "test_choice", "acc") for r in vals]),
                     mean_std([rs.value(r, "ood", "loss") for r in vals]),
                     mean_std([rs.value(r, "ood_choice", "acc") for r in vals]),
                     mean_std([rs.value(r, "test", "kl_to_reference") for r in vals]),
                     "–" if m == "lora" else interval(paired(rs, recs, lora, "test", "loss"))])
    if not rows:
        return out + ["(filled in when the main runs have been made)", ""]
    out += table(["method", "lr (dev)", "trainable params at end", "test loss", "test MC acc",
                  "OOD loss", "OOD MC acc", "KL to full FT", "test loss − LoRA, 95 % CI"], rows)
    means = {m: statistics.mean(v) for m, v in loss.items()
             if v and all(x is not None for x in v)}
    sentences = []
    if means:
        best = min(means, key=means.get)
        clear = []
        for m in methods:
            ci = t_interval(paired(rs, rs.train(m, rs.d["lr"].get(m)), lora, "test", "loss"))
            if m != "lora" and ci and (ci[2] < 0 or ci[1] > 0):
                clear.append(f"{X.NAMES[m]} ({ci[0]:+.3f})")
        sentences.append(
            f"Over seeds {rs.args.seeds} at {rs.args.steps} steps, {X.NAMES[best]} had the lowest "
            f"mean test loss ({means[best]:.3f}); the 95 % interval of the paired test-loss "
            f"difference to LoRA excludes zero for "
            + (", ".join(clear) if clear else "none of the other methods") + ".")
    lad = {v: l for v, l in rs.d["ladders"].items()
           if l.complete and v in methods}
    if lad:
        survived = {v: max((lr for lr in l.levels if l.first_divergent is None
                            or lr < l.first_divergent), default=0.0) for v, l in lad.items()}
        top = max(survived.values())
        names = [X.NAMES[v] for v, x in survived.items() if x == top]
        capped = all(lad[v].first_divergent is None for v, x in survived.items() if x == top)
        sentences.append(f"On the stability ladder ({rs.args.grid_steps} steps, seeds "
                         f"{rs.args.grid_seeds}) the highest learning rate without a diverged "
                         f"seed was {top:g}{' (the top of the ladder)' if capped else ''}, "
                         f"reached by {' and '.join(names)}.")
    out += [" ".join(sentences), "",
            "(Table and sentences are generated from the records by fixed rules, ready to copy; "
            "the discussion below interprets them.)", ""]
    return out


def runs_section(rs: Records) -> list[str]:
    rows = []
    for key, r in sorted(rs.results.items()):
        if r.get("kind") != "train" or r["steps"] != rs.args.steps:
            continue
        rows.append([key, r.get("role", ""), r["status"], str(bool(rs.diverged(r))).lower()
                     if X.finished(r) else "–", fmt(r.get("dev_loss_end")),
                     fmt(rs.value(r, "test", "loss")), fmt(rs.value(r, "ood", "loss")),
                     fmt(rs.value(r, "test", "kl_to_reference")),
                     fmt(r.get("process_wall_s"), 0), fmt(r.get("load_mean"), 2)])
    if not rows:
        return []
    return (["### Every run at the main length", ""]
            + table(["run", "role", "status", "diverged", "dev loss end", "test loss",
                     "OOD loss", "test KL", "wall s", "load"], rows))


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(ys: list[float], k: int = X.WINDOW) -> list[float]:
    return [statistics.mean(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]


def figures(rs: Records, out_dir: Path, note_dir: Path) -> dict:
    """Write the PNGs that have data; returns name -> path relative to the note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    link = lambda p: os.path.relpath(p, note_dir)
    plt = _plt()
    # loss curves of the main runs
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for v in [m for m in X.METHODS if m in rs.args.methods] + ["full"]:
        recs = list(rs.train(v, rs.d["lr"].get(v), [0] if v == "full" else None).values())
        curves = [smooth([loss for _, loss in r["curve"]]) for r in recs if r.get("curve")]
        n = min((len(c) for c in curves), default=0)
        if not n:
            continue
        steps = [s for s, _ in recs[0]["curve"]][:n]
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        line, = ax.plot(steps, mean, "k--" if v == "full" else "-", lw=1.2,
                        label=f"{X.NAMES[v]} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                            [max(c[i] for c in curves) for i in range(n)],
                            color=line.get_color(), alpha=0.15)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set(xlabel="optimizer step", ylabel="training loss (10-step mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        made["curves"] = save(fig, out_dir / "loss_curves.png", link)
    plt.close(fig)
    # the lr ladders
    ladders = {v: lad for v, lad in rs.d["ladders"].items() if lad.mean_dev or lad.n_diverged}
    if ladders:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        top = max([y for lad in ladders.values() for y in lad.mean_dev.values()] or [1.0])
        row = 0  # each method's × marks get their own height, so that equal lrs do not overlap
        for v, lad in ladders.items():
            xs = [lr for lr in lad.levels if lr in lad.mean_dev and not lad.n_diverged.get(lr)]
            line, = ax.plot(xs, [lad.mean_dev[lr] for lr in xs], "o-", label=X.NAMES[v])
            bad = [lr for lr in lad.levels if lad.n_diverged.get(lr)]
            if bad:
                ax.plot(bad, [top * 1.3 * 1.15 ** row] * len(bad), "x", color=line.get_color(),
                        ms=8, mew=2)
                row += 1
        if row:
            ax.text(0.99, 0.02, "× a seed diverged (no dev loss drawn)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="peak learning rate",
               ylabel=f"final dev loss ({rs.args.grid_steps} steps)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        made["ladder"] = save(fig, out_dir / "lr_ladder.png", link)
        plt.close(fig)
    # CTR-LoRA's measured per-step KL along its ladder
    lad = rs.d["ladders"].get("ctr")
    recs = [(lr, rs.results.get(X.train_job("ctr", lr, rs.args.grid_seeds[0],
                                            rs.args.grid_steps, "").key))
            for lr in (lad.levels if lad else [])]
    recs = [(lr, r) for lr, r in recs if X.finished(r) and r.get("kl")]
    if recs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.4))
        for lr, r in recs:
            steps = [s for s, _ in r["curve"]]
            a1.plot(steps, [max(k or 1e-12, 1e-12) for k in r["kl"]], lw=0.8, label=f"lr {lr:g}")
            a2.plot(steps, r.get("shrink") or [1.0] * len(steps), lw=0.8, label=f"lr {lr:g}")
        a1.set(yscale="log", xlabel="step", ylabel="measured KL of the applied step")
        a2.set(yscale="log", xlabel="step", ylabel="shrink factor of the step")
        for a in (a1, a2):
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=6)
        made["ctr_kl"] = save(fig, out_dir / "ctr_kl.png", link)
        plt.close(fig)
    # rank heatmaps of seed 0
    for m in ("adalora", "triadapt", "ctr"):
        r = rs.train(m, rs.d["lr"].get(m), [0]).get(0)
        if r and r.get("ranks_end"):
            made[f"ranks_{m}"] = heatmap(plt, r["ranks_end"], X.NAMES[m],
                                         out_dir / f"ranks_{m}.png", link)
    return made


def heatmap(plt, ranks: dict[str, int], title: str, path: Path, link) -> str:
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = sorted({int(n.split("layers.")[1].split(".")[0]) for n in ranks if "layers." in n})
    grid = [[ranks.get(next((n for n in ranks if f"layers.{i}." in n and n.endswith(t)), ""), 0)
             for t in types] for i in layers]
    fig, ax = plt.subplots(figsize=(4.2, 0.16 * len(layers) + 1.4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set(xticks=range(len(types)), yticks=range(0, len(layers), 5), ylabel="layer",
           title=f"{title}: final ranks (seed 0)")
    ax.set_xticklabels(types, rotation=45, fontsize=7)
    fig.colorbar(im, ax=ax)
    return save(fig, path, link)


def save(fig, path: Path, link) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return link(path)


# ------------------------------------------------------------------------------------------------
# the note
# ------------------------------------------------------------------------------------------------

TEMPLATE = """# Experiments

(The protocol is in notes/experiments.md; this note was written by
`python scripts/experiments.py` for the runs in this folder.)

{generated}

## Discussion

<!-- discussion:begin -->
(hand-written after the runs; the report keeps this section)
<!-- discussion:end -->
"""


def render(rs: Records, figs: dict, records_dir: str) -> str:
    lines = [BEGIN, "", "## Results", "",
             f"*Generated by `python scripts/experiments.py --report` from the "
             f"{len(rs.results)} records in `{records_dir}`; do not edit between the generated "
             f"markers.*", ""]
    lines += compute_section(rs) + settings_section(rs) + ladder_section(rs, figs)
    lines += main_sections(rs, figs) + control_sections(rs) + efficiency_section(rs)
    lines += claims_section(rs) + readme_section(rs) + runs_section(rs)
    wrap = lambda line: (line if line.startswith(("|", "![")) else textwrap.fill(
        line, 115, break_long_words=False, break_on_hyphens=False))
    return "\n".join([wrap(line) for line in lines] + [END])


def write_report(results: dict, args) -> Path:
    rs = Records(results, args)
    note = Path(args.note)
    figs = figures(rs, Path(args.out_dir), note.parent)
    text = render(rs, figs, X.rel(Path(args.out_dir) / "results"))
    old = note.read_text() if note.is_file() else TEMPLATE.format(generated=BEGIN + "\n" + END)
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{note} has no {BEGIN} ... {END} markers: add them where the "
                         f"generated part goes")
    new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(new)
    print(f"wrote {note} and {len(figs)} figure(s) in {args.out_dir}")
    return note
