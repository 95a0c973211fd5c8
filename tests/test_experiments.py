"""scripts/experiments.py's rules (diverged, the lr ladder, the plan) and its report, on synthetic
records (no training: CI keeps the report code working), and the shipped dev / OOD splits."""
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import experiments as X  # noqa: E402
import experiments_report as R  # noqa: E402

L0 = 10.0


def train_record(variant, lr, seed, steps, dev_end=1.0, curve_level=2.0, **extra):
    method, flags = X.VARIANTS[variant]
    rec = {"kind": "train", "status": "ok", "returncode": 0, "variant": variant, "method": method,
           "flags": flags, "lr": lr, "seed": seed, "steps": steps, "steps_logged": steps,
           "nonfinite_lines": 0, "dev_loss_start": L0, "dev_loss_end": dev_end,
           "curve": [[s, curve_level] for s in range(1, steps + 1)], "params_start": 1000,
           "params_end": 900, "update_norm": 0.1, "train_loop_s": steps * 0.5,
           "process_wall_s": steps * 0.5 + 10, "started": 1e9 + seed, "ended": 1e9 + seed + 60,
           "peak_rss_mib": 1100.0, "cpu_s": 50.0, "load_mean": 2.0, "load_max": 2.5,
           "ranks_end": {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(2)}}
    rec.update(extra)
    return rec


# --- diverged -------------------------------------------------------------------------------


def test_diverged_rules_each_trigger_alone():
    ok = train_record("lora", 1e-2, 0, 40)
    assert not X.diverged(ok, L0)
    assert X.diverged({**ok, "status": "diverged-exit"}, L0)                      # (a)
    assert X.diverged({**ok, "steps_logged": 39}, L0)                             # (b)
    assert X.diverged({**ok, "nonfinite_lines": 1}, L0)                           # (b)
    assert X.diverged({**ok, "dev_loss_end": L0}, L0)                             # (c)
    assert X.diverged({**ok, "dev_loss_end": math.nan}, L0)                       # (c)
    spike = [[s, 20.0 if 15 <= s < 25 else 2.0] for s in range(1, 41)]
    assert X.diverged({**ok, "curve": spike}, L0)                                 # (d)


def test_diverged_ignores_the_warm_up_and_single_noisy_steps():
    ok = train_record("lora", 1e-2, 0, 40)
    early = [[s, 30.0 if s <= X.WINDOW else 2.0] for s in range(1, 41)]   # first steps: warm-up
    assert not X.diverged({**ok, "curve": early}, L0)
    one = [[s, 50.0 if s == 20 else 2.0] for s in range(1, 41)]            # window mean 6.8 < L0
    assert not X.diverged({**ok, "curve": one}, L0)


# --- the ladder -------------------------------------------------------------------------------


def runs_for(outcome, seeds=(0, 1), steps=100, variant="lora"):
    """runs_at for ladder(): outcome(lr) -> dev loss (math.inf = diverged); None = not run."""
    def runs_at(lr):
        v = outcome(lr)
        return [None if v is None else train_record(variant, lr, s, steps, dev_end=v)
                for s in seeds]
    return runs_at


def test_ladder_climbs_until_a_seed_diverges_and_chooses_the_best_below():
    dev = {3e-3: 2.0, 1e-2: 1.0, 3e-2: 1.5, 0.1: 1.8, 0.3: math.inf}
    lad = X.ladder("lora", runs_for(dev.get), L0)
    assert lad.complete and lad.levels == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert lad.chosen == 1e-2 and lad.first_divergent == 0.3


def test_ladder_waits_for_unfinished_runs_and_goes_down_when_best_is_lowest():
    dev = {3e-3: 1.0, 1e-2: 2.0, 3e-2: math.inf}
    lad = X.ladder("lora", runs_for(dev.get), L0)
    assert not lad.complete and lad.levels == [1e-3, 3e-3, 1e-2, 3e-2]    # 1e-3 asked for
    dev[1e-3] = 1.5
    lad = X.ladder("lora", runs_for(dev.get), L0)
    assert lad.complete and lad.chosen == 3e-3


def test_ladder_excludes_lrs_at_and_above_the_first_divergence():
    dev = {1e-3: 2.5, 3e-3: 2.0, 1e-2: math.inf, 3e-2: 0.5}   # 3e-2: lucky, above a divergence
    lad = X.ladder("lora", runs_for(dev.get), L0)
    assert lad.first_divergent == 1e-2 and lad.chosen == 3e-3


def test_full_fine_tuning_ladder_brackets_the_best_lr_without_climbing_to_divergence():
    dev = {1e-5: 2.0, 3e-5: 1.0, 1e-4: 1.2}
    lad = X.ladder("full", runs_for(dev.get, seeds=(0,), variant="full"), L0)
    assert lad.complete and lad.levels == [1e-5, 3e-5, 1e-4] and lad.chosen == 3e-5


# --- the plan ---------------------------------------------------------------------------------


def test_plan_lists_every_phase_and_sizes_the_protocol(capsys):
    args = X.parse_args(["--plan", "--out-dir", "/nonexistent-experiments"])
    X.show_plan(args)
    out = capsys.readouterr().out
    for role in ("grid", "main", "reference", "control: trust region", "control: whitening",
                 "control: orthogonality penalty", "eval main", "efficiency"):
        assert role in out
    hours = float(out.split("about ")[1].split(" h")[0])
    assert 2.0 <= hours <= 6.0                              # the protocol is sized to ~4 hours


# --- the report on synthetic records -------------------------------------------------------------


def synthetic_results(steps=200, grid_steps=100):
    """A complete set of records for two methods (LoRA, CTR-LoRA), known numbers."""
    res = {"settings": {"kind": "settings", "args": {
        "methods": ["lora", "ctr"], "seeds": [0, 1, 2], "steps": steps, "grid_steps": grid_steps,
        "grid_seeds": [0, 1], "full_grid_seeds": [0], "div_seeds": [0, 1], "grid_start": {},
        "phases": ["grid", "main", "controls", "bench"]}}}
    res["base"] = {"kind": "base", "status": "ok", "process_wall_s": 30.0, "splits": {
        "dev": {"loss": L0}, "test": {"loss": 10.2, "exact_match": 0.0},
        "test_choice": {"acc": 0.66}, "ood": {"loss": 10.5, "exact_match": 0.0},
        "ood_choice": {"acc": 0.5}}}
    dev = {"lora": {3e-3: 2.0, 1e-2: 1.0, 3e-2: math.inf},
           "ctr": {1e-2: 1.5, 3e-2: 1.2, 1e-1: 1.1, 3e-1: 1.3, 1.0: math.inf},
           "ctr-notr": {1e-2: 1.5, 3e-2: 1.2, 1e-1: math.inf},
           "full": {1e-5: 1.0, 3e-5: 0.8, 1e-4: 0.9}}
    for v, by_lr in dev.items():
        for lr, d in by_lr.items():
            for s in ([0] if v == "full" else [0, 1]):
                rec = train_record(v, lr, s, grid_steps, dev_end=d)
                if v.startswith("ctr"):
                    rec.update(kl=[0.01] * grid_steps, kl_max=[0.02] * grid_steps,
                               shrink=[0.5] * grid_steps, clip_rate=[0.25] * grid_steps)
                res[X.train_job(v, lr, s, grid_steps, "").key] = rec
    test_loss = {"lora": [1.0, 1.2, 1.1], "ctr": [0.9, 1.0, 1.05], "adalora": [1.3, 1.2, 1.4],
                 "ctr-notr": [1.0, 1.1, 1.1]}
    for v, lr, seeds in (("lora", 1e-2, [0, 1, 2]), ("ctr", 0.1, [0, 1, 2]),
                         ("adalora", 0.1, [0, 1, 2]), ("ctr-notr", 0.1, [0, 1, 2]),
                         ("full", 3e-5, [0, 1]), ("lora", 3e-2, [0, 1]),
                         ("adalora", 3e-2, [0, 1]), ("ctr", 3e-2, [0, 1]),
                         ("ctr-notr", 3e-2, [0, 1])):
        for s in seeds:
            key = X.train_job(v, lr, s, steps, "").key
            res[key] = train_record(v, lr, s, steps, role="main")
            loss = test_loss.get(v, [0.8, 0.85])[s]
            res["eval/" + key] = {"kind": "eval", "status": "ok", "process_wall_s": 100.0,
                                  "run": key, "splits": {
                                      "test": {"loss": loss, "exact_match": 0.5,
                                               "kl_to_reference": loss / 2},
                                      "test_choice": {"acc": 0.8 + 0.01 * s},
                                      "ood": {"loss": loss + 1, "exact_match": 0.1,
                                              "kl_to_reference": loss},
                                      "ood_choice": {"acc": 0.6}}}
    res["bench"] = {"kind": "bench", "status": "ok", "process_wall_s": 600.0, "workload": "smollm2",
                    "args": {"batch": 4, "seq": 128, "threads": 1, "rounds": 3},
                    "setups": {"ours-lora": {"step_s": 1.0, "peak_mib": 900.0},
                               "peft-lora": {"step_s": 1.5, "peak_mib": 1000.0},
                               "peft-adalora": {"step_s": 1.8, "peak_mib": 1100.0},
                               "ours-ctr": {"step_s": 2.0, "peak_mib": 950.0},
                               "paired-ctr": {"pair_ratios": [2.0, 2.1, 1.9]}}}
    return res


def report_args(tmp_path):
    args = X.parse_args(["--out-dir", str(tmp_path / "out"), "--note", str(tmp_path / "note.md")])
    return args


def test_report_tables_come_from_the_records(tmp_path):
    note = tmp_path / "note.md"
    note.write_text("# Protocol (kept)\n\n" + R.BEGIN + "\nold tables\n" + R.END
                    + "\n\n## Discussion\n<!-- discussion:begin -->\nmine\n"
                    "<!-- discussion:end -->\n")
    R.write_report(synthetic_results(), report_args(tmp_path))
    text = note.read_text()
    assert text.startswith("# Protocol (kept)") and "mine" in text and "old tables" not in text
    # chosen learning rates and the stability limits, from the ladders
    rs = R.Records(synthetic_results(), report_args(tmp_path))
    assert rs.d["lr"] == {"lora": 1e-2, "ctr": 0.1, "full": 3e-5, "ctr-notr": 3e-2}
    assert rs.d["lr_lora_diverges"] == 3e-2
    # LoRA's test loss: mean ± std of 1.0, 1.2, 1.1
    assert "1.100 ± 0.100" in text
    # CTR-LoRA − LoRA paired test loss: differences -0.1, -0.2, -0.05 -> t-interval with df 2
    diffs = [-0.1, -0.2, -0.05]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}] (n=3)" in text
    # efficiency figures, the claims table and the compute time are there
    assert "| ours-ctr | 2.000 | 2.000 | 950 |" in text
    assert "CTR-LoRA: more stable than PEFT baselines" in text and "reproduced" in text
    assert "process-hours" in text
    assert "CTR-LoRA had the lowest mean test loss (0.983)" in text     # the README sentences
    for png in ("loss_curves.png", "lr_ladder.png", "ctr_kl.png", "ranks_ctr.png"):
        assert (tmp_path / "out" / png).is_file() and png in text


def test_records_name_the_commit_of_their_code_and_the_report_counts_them(tmp_path, monkeypatch):
    results = synthetic_results()
    keys = [k for k in results if k not in ("settings", "base")]
    for k in keys[:3]:
        results[k]["commit"] = "abc1234"
    results[keys[3]]["commit"] = "def5678+dirty"
    R.write_report(results, report_args(tmp_path))
    text = " ".join((tmp_path / "note.md").read_text().split())
    unrecorded = sum(1 for r in results.values() if "process_wall_s" in r) - 4
    assert (f"(commit: runs): abc1234: 3, def5678+dirty: 1, not recorded: {unrecorded}."
            in text)
    assert X.code_version().split("+")[0] == X.subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
        text=True).stdout.strip()
    monkeypatch.setattr(X, "ROOT", tmp_path)        # not a git checkout: no commit, no error
    assert X.code_version() is None


def test_report_without_records_writes_placeholders(tmp_path):
    R.write_report({}, report_args(tmp_path))
    text = (tmp_path / "note.md").read_text()
    assert "No runs yet" in text and R.BEGIN in text and R.END in text


def test_t_interval_matches_the_textbook_formula():
    m, lo, hi = R.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and hi - m == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))


# --- the shipped splits -------------------------------------------------------------------------


def words(path, key):
    return [json.loads(x)[key].split("Word: ")[1].split("\n")[0]
            for x in (REPO / "data" / path).read_text().splitlines()]


def test_dev_and_ood_splits_are_disjoint_from_train_and_test_and_ood_labels_are_new():
    train, test = set(words("wordnet_train.jsonl", "prompt")), set(words("wordnet_val.jsonl",
                                                                         "prompt"))
    dev, ood = set(words("wordnet_dev.jsonl", "prompt")), set(words("wordnet_ood.jsonl",
                                                                    "prompt"))
    assert len(dev) >= 150 and len(ood) >= 150
    for a, b in ((train, dev), (test, dev), (train, ood), (test, ood), (dev, ood)):
        assert not a & b
    label = lambda f: {json.loads(x)["completion"] for x in (REPO / "data" / f).read_text()
                       .splitlines()}
    train_labels = label("wordnet_train.jsonl")
    assert label("wordnet_dev.jsonl") <= train_labels
    assert not label("wordnet_ood.jsonl") & train_labels
    for x in (REPO / "data" / "wordnet_ood_choice.jsonl").read_text().splitlines():
        r = json.loads(x)
        assert not set(r["choices"]) & train_labels and len(set(r["choices"])) == 4


def test_data_files_match_their_published_checksums():
    for line in (REPO / "data" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((REPO / "data" / name).read_bytes()).hexdigest() == digest, name
