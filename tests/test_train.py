"""train.py: accumulation, resume, signals, gradients under checkpointing, overfitting, bad input,
peft export."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import adapter_io as IO
import adapters as A
import data as D
import model as M
import train as T

REPO = M.REPO_DIR
TRAIN_DATA = str(REPO / "data" / "wordnet_train.jsonl")


def tiny_cfg(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), data=TRAIN_DATA, val_data="", out=str(out), steps=6,
                batch_size=4, log_every=1, eval_every=0, save_every=0, lr=5e-3, rank=4,
                targets="q_proj,v_proj,down_proj")
    base.update(kw)
    cfg = T.TrainConfig(**base)
    T.validate(cfg)
    return cfg


def lora_model(tiny_dir, seed=0, random_b=True):
    net, tok = M.load_model_and_tokenizer(tiny_dir, torch.float32, "cpu")
    torch.manual_seed(seed)
    A.apply_method(net, "lora", A.AdapterConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    if random_b:
        with torch.no_grad():
            for layer in A.adapter_layers(net).values():
                layer.lora_B.normal_(0, 0.1)
    return net, tok


def lora_grads(net):
    return {n: p.grad.clone() for n, p in A.adapter_named_parameters(net).items()}


# ------------------------------------------------------------------------------- the math of a step

def test_gradient_accumulation_4x2_equals_batch_of_8(tiny_dir):
    net, tok = lora_model(tiny_dir)
    words = "the cat sat on a warm mat while rain fell over the quiet old town".split()
    # prompts and completions of many lengths
    records = [{"prompt": " ".join(words[:2 + i]),
                "completion": " " + " ".join(words[i:i + 1 + 2 * i])}
               for i in range(8)]
    examples = [D.encode_example(r, tok) for r in records]
    assert len({len(ids) for ids, _ in examples}) >= 6
    big = [D.collate(examples, tok.pad_id)]
    small = [D.collate(examples[i:i + 2], tok.pad_id) for i in range(0, 8, 2)]
    n_label = D.count_label_tokens(big[0])
    assert n_label == sum(D.count_label_tokens(b) for b in small)

    loss_big = T.accumulate_gradients(net, big, n_label, "cpu")
    g_big = lora_grads(net)
    net.zero_grad()
    loss_small = T.accumulate_gradients(net, small, n_label, "cpu")
    g_small = lora_grads(net)
    assert abs(loss_big - loss_small) < 1e-5
    for n in g_big:
        assert torch.allclose(g_big[n], g_small[n], atol=1e-6, rtol=1e-4), n

    # the test can tell: averaging per micro-batch (the common mistake) gives a different gradient
    net.zero_grad()
    for b in small:
        T.accumulate_gradients(net, [b], D.count_label_tokens(b) * len(small), "cpu")
    g_wrong = lora_grads(net)
    assert max((g_wrong[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-4


def test_every_lora_parameter_gets_a_gradient_under_checkpointing(tiny_dir):
    net, tok = lora_model(tiny_dir)
    batch = D.collate(D.encode_dataset(D.load_jsonl(TRAIN_DATA)[:8], tok, 64), tok.pad_id)
    grads = {}
    for ckpt in (False, True):
        net.zero_grad()
        net.train()
        net.grad_checkpoint = ckpt
        net(batch["input_ids"], labels=batch["labels"]).backward()
        grads[ckpt] = lora_grads(net)
    assert len(grads[True]) == 2 * 3 * 2                     # A and B, 3 targets, 2 layers
    for n, g in grads[True].items():
        assert g.abs().sum() > 0, f"{n} has a zero gradient under gradient checkpointing"
        assert torch.allclose(g, grads[False][n], atol=1e-6), n
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)


def test_prompt_positions_get_no_gradient(tiny_dir):
    """The final hidden state at a prompt position feeds only that position's head: its gradient
    must be 0."""
    net, tok = lora_model(tiny_dir)
    records = D.load_jsonl(TRAIN_DATA)[:4]
    batch = D.collate(D.encode_dataset(records, tok, 64), tok.pad_id)
    captured = {}
    def keep_hidden(module, inputs, output):
        output.retain_grad()
        captured["h"] = output
    net.model.norm.register_forward_hook(keep_hidden)
    net(batch["input_ids"], labels=batch["labels"]).backward()
    g = captured["h"].grad.abs().sum(-1)                                     # (B, T)
    labelled = batch["labels"] != D.IGNORE_INDEX
    assert (g[~labelled] == 0).all() and (g[labelled] > 0).all()
    for row, r in enumerate(records):                        # completion tokens + EOS, no more
        assert labelled[row].sum() == len(tok.encode(r["completion"])) + 1


def test_lr_schedule_warms_up_each_group_from_its_start():
    cfg = T.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert T.lr_at(0, 0, cfg) == pytest.approx(0.1)
    assert T.lr_at(9, 0, cfg) == pytest.approx(
        T.lr_at(9, 0, cfg.__class__(steps=100, lr=1.0, warmup_steps=0, min_lr_ratio=0.1)))
    # a new group restarts warm-up
    assert T.lr_at(50, 50, cfg) == pytest.approx(0.1 * T.lr_at(50, 0, cfg))
    assert T.lr_at(99, 0, cfg) == pytest.approx(0.1)                  # cosine ends at min_lr_ratio


# --------------------------------------------------------------------------------------------- runs

def test_small_batch_can_be_overfitted(tiny_dir, tmp_path):
    four = tmp_path / "four.jsonl"
    four.write_text("".join(json.dumps(r) + "\n" for r in D.load_jsonl(TRAIN_DATA)[:4]))
    cfg = tiny_cfg(tiny_dir, tmp_path / "run", data=str(four), steps=80, lr=2e-2, rank=8,
                   warmup_steps=5, targets=T.ALL_LINEARS)
    T.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.1 * first and last < 0.5, (first, last)

    # eval.exact_match (one teacher-forced pass) agrees with real greedy decoding,
    # example by example
    import eval as E
    net, tok = M.load_model_and_tokenizer(tiny_dir, torch.float32, "cpu")
    IO.load_adapter(net, str(tmp_path / "run"))
    records = D.load_jsonl(TRAIN_DATA)[:8]                        # 4 memorized + 4 unseen
    by_generation = []
    for r in records:
        prompt_ids = tok.encode(r["prompt"], bos=True)
        target = tok.encode(r["completion"]) + [tok.eos_id]
        by_generation.append(M.generate(net, prompt_ids, len(target) + 2, eos_id=tok.eos_id)
                             == target)
    assert sum(by_generation[:4]) >= 3                            # memorized ones are reproduced
    assert E.exact_match(net, tok, records)["exact_match"] == sum(by_generation) / len(records)


def test_sigterm_saves_a_checkpoint_that_resumes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--model", str(tiny_dir), "--data", TRAIN_DATA,
           "--val-data", "", "--out", str(out), "--steps", "3000", "--batch-size", "2",
           "--log-every", "1", "--save-every", "0", "--rank", "2", "--targets", "q_proj"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists()
                                      or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ckpt = T.latest_checkpoint(out)
    assert ckpt is not None and "saved checkpoint" in err
    stopped_at = torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 3000
    r = subprocess.run(cmd[:cmd.index("--steps") + 1] + [str(stopped_at + 2)]
                       + cmd[cmd.index("--steps") + 2:] + ["--resume"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpt} at step {stopped_at}" in r.stderr
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]


def test_run_folder_holds_the_documented_products_and_peft_gives_our_logits(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=4))
    for name in ("adapter.safetensors", "adapter.json", "peft/adapter_model.safetensors",
                 "peft/adapter_config.json", "metrics.jsonl", "run_config.json", "loss.png"):
        assert (out / name).is_file(), name
    ours = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    IO.load_adapter(ours, str(out))
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                   str(out / "peft")).eval()
    idx = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = M.load_pretrained(tiny_dir, torch.float32, "cpu")(idx)
        mine = ours(idx)
        assert (mine - base).abs().max() > 1e-3                   # the adapter learned something
        assert (hf(input_ids=idx).logits - mine).abs().max().item() <= 1e-5


def test_full_finetuning_writes_a_loadable_model(tiny_dir, tmp_path):
    out = tmp_path / "full"
    T.train(tiny_cfg(tiny_dir, out, method="full", steps=3, lr=1e-3))
    assert json.loads((out / "run_config.json").read_text())["method"] == "full"
    tuned = M.load_pretrained(out / "model", torch.float32, "cpu")
    base = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight,
                           base.model.layers[0].mlp.up_proj.weight)


# ---------------------------------------------------------------------- nothing NaN/inf is written

def checkpoint_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}


def remember_saves(monkeypatch, out) -> dict:
    """checkpoint_bytes(out) as the last good save left it, kept up to date by every save."""
    before, real_save = {}, T.save_checkpoint

    def save_and_remember(*args, **kwargs):
        path = real_save(*args, **kwargs)
        before.update(checkpoint_bytes(out))
        return path
    monkeypatch.setattr(T, "save_checkpoint", save_and_remember)
    return before


@pytest.mark.parametrize("method", ["lora", "full"])
def test_weights_that_overflow_are_never_saved_and_the_checkpoints_stay(tiny_dir, tmp_path,
                                                                        method, monkeypatch):
    """Step 3's optimizer step leaves an inf weight (as a too-large --lr can): the run's end
    refuses to write it — one FloatingPointError naming the step, the tensor and --lr — and the
    step-2 checkpoint, `latest` and the run folder are left exactly as they were."""
    out = tmp_path / "run"
    real_step = T.optimizer_step

    def overflow_at_step_3(optimizer, params, method_hooks, step, clip):
        result = real_step(optimizer, params, method_hooks, step, clip)
        if step == 2:
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(T, "optimizer_step", overflow_at_step_3)
    before = remember_saves(monkeypatch, out)
    with pytest.raises(FloatingPointError) as e:
        T.train(tiny_cfg(tiny_dir, out, method=method, steps=4, save_every=2, lr=1e-3))
    msg = str(e.value)
    assert msg.startswith("step 4: ") and "holds NaN/inf, so nothing was saved" in msg, msg
    assert "--lr 0.001 too high?" in msg and "latest: step-000002" in msg and "\n" not in msg
    assert T.latest_checkpoint(out).name == "step-000002"
    assert checkpoint_bytes(out) == before                        # no .tmp folder either
    weights = IO.FULL_MODEL_DIR if method == "full" else IO.ADAPTER_WEIGHTS_NAME
    assert not (out / weights).exists() and not (out / "peft").exists()


def test_a_nonfinite_method_state_is_never_saved(tiny_dir, tmp_path, monkeypatch):
    """The method's own state is saved too (CTR-LoRA's curvature statistics): an inf entry that
    appears in it after step 3 is refused at the next save like an inf weight, by its name."""
    out = tmp_path / "run"
    real_step = T.optimizer_step

    def corrupt_the_statistics_at_step_3(optimizer, params, method_hooks, step, clip):
        result = real_step(optimizer, params, method_hooks, step, clip)
        if step == 2:
            name = sorted(method_hooks.curvature)[0]
            method_hooks.curvature[name]["s"][0] = float("inf")
        return result

    monkeypatch.setattr(T, "optimizer_step", corrupt_the_statistics_at_step_3)
    before = remember_saves(monkeypatch, out)
    with pytest.raises(FloatingPointError) as e:
        T.train(tiny_cfg(tiny_dir, out, method="ctr", steps=4, save_every=2, lr=1e-3))
    msg = str(e.value)
    assert msg.startswith("step 4: ctr state/curvature/") and msg.split()[3].endswith("/s"), msg
    assert T.latest_checkpoint(out).name == "step-000002" and checkpoint_bytes(out) == before


def test_a_failed_checkpoint_write_leaves_the_older_ones_and_latest(tiny_dir, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2))
    before = checkpoint_bytes(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T.torch, "save", disk_full)
    with pytest.raises(OSError):
        T.train(tiny_cfg(tiny_dir, out, steps=4, save_every=1, resume=True))
    assert checkpoint_bytes(out) == before and T.latest_checkpoint(out).name == "step-000002"


def test_no_writer_of_tensors_writes_nan(tiny_dir, tmp_path):
    """write_safetensors, the one writer of weight files, refuses NaN/inf: save_adapter, the peft
    export and a full model's save_pretrained all go through it; the old file stays."""
    from fileio import write_safetensors
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": torch.ones(2)})
    good = path.read_bytes()
    with pytest.raises(FloatingPointError, match="tensor b holds NaN/inf; not written"):
        write_safetensors(path, {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
    assert path.read_bytes() == good
    net, _ = lora_model(tiny_dir)
    with torch.no_grad():
        next(iter(A.adapter_layers(net).values())).lora_B[0, 0] = float("inf")
    cfg = A.AdapterConfig(r=4, targets=["q_proj", "v_proj", "down_proj"])
    for write in (lambda: IO.save_adapter(net, cfg, str(tmp_path / "adapter")),
                  lambda: IO.export_peft(net, cfg, str(tmp_path / "peft")),
                  lambda: M.save_pretrained(net.state_dict(), net.config, tmp_path / "full")):
        with pytest.raises(FloatingPointError, match="holds NaN/inf"):
            write()
    assert not list(tmp_path.rglob("*.safetensors"))[1:]        # only w.safetensors exists


def test_a_diverged_run_ends_with_one_line_naming_the_steps_and_the_lr(tiny_dir, tmp_path, capsys):
    """--lr 1e30: step 1 is applied, then every step is NaN/inf; after --max-nonfinite of them
    the CLI prints one error line (no traceback) with the steps as the progress lines number
    them, the likely cause, and the checkpoint that is kept."""
    argv = ["--model", str(tiny_dir), "--data", TRAIN_DATA, "--val-data", "", "--out",
            str(tmp_path / "run"), "--lr", "1e30", "--warmup-steps", "0", "--max-nonfinite", "2",
            "--save-every", "1", "--steps", "5", "--batch-size", "2", "--rank", "2",
            "--targets", "q_proj"]
    with pytest.raises(SystemExit) as e:
        M.cli(T.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1
    assert err[-4].startswith("step 2: non-finite") and err[-2].startswith("step 3: non-finite")
    assert err[-1].startswith("error: steps 2-3: 2 non-finite steps in a row"), err[-1]
    assert "--lr 1e+30 too high?" in err[-1] and "latest: step-000002" in err[-1]


# ---------------------------------------------------------------------------------------- bad input

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True,
                          text=True, timeout=120)


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_malformed_jsonl_line_is_named(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
                   '{"prompt": oops}\n')
    msg = one_line_error(run_cli("--model", str(tiny_dir), "--data", str(bad), "--val-data", "",
                                 "--out", str(tmp_path / "o")))
    assert "line 3" in msg


def test_empty_dataset_is_an_error(tiny_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match="empty"):
        T.train(tiny_cfg(tiny_dir, tmp_path / "o", data=str(empty)))


def test_unknown_method_is_a_one_line_cli_error(tmp_path):
    msg = one_line_error(run_cli("--method", "qlora", "--out", str(tmp_path / "o")))
    assert "unknown method 'qlora'" in msg


def test_unknown_target_module_is_an_error(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="'qkv_proj' matches no nn.Linear"):
        T.train(tiny_cfg(tiny_dir, tmp_path / "o", targets="q_proj,qkv_proj"))


def test_sequence_longer_than_the_model_allows_is_an_error(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--seq-len 1000 is longer than the model allows"):
        T.train(tiny_cfg(tiny_dir, tmp_path / "o", seq_len=1000))


def test_failed_start_never_touches_existing_checkpoints(tiny_dir, tmp_path):
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2))
    ckpt = T.latest_checkpoint(out)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    # no --resume/--overwrite
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        T.train(tiny_cfg(tiny_dir, out, steps=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(D.DataError, match="line 1"):
        T.train(tiny_cfg(tiny_dir, out, steps=4, data=str(bad), resume=True))
    with pytest.raises(ValueError, match="cannot resume with different settings"):
        T.train(tiny_cfg(tiny_dir, out, steps=4, rank=8, resume=True))
    assert T.latest_checkpoint(out) == ckpt
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_help_explains_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    flags = [f.name for f in T.fields(T.TrainConfig) if f.name != "method_options"]
    flags += [f.name for f in T.method_option_fields()]       # every method hyper-parameter too
    for name in flags:
        assert "--" + name.replace("_", "-") in r.stdout, name


# ---------------------------------------------------------- resume: the run folder stays whole

def metric_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_resume_drops_the_metrics_rows_logged_after_its_checkpoint(tiny_dir, tmp_path):
    """A run that logged steps 1-6 but whose last checkpoint is at step 3 (a stop before the
    step-6 save; and half a row written): the resumed run logs steps 4-6 again, so metrics.jsonl
    holds every step once, with the uninterrupted run's losses."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, ref, steps=6))
    T.train(tiny_cfg(tiny_dir, out, steps=6, save_every=3))
    ckpt = out / "checkpoints"
    shutil.rmtree(ckpt / "step-000006")
    (ckpt / "latest").write_text("step-000003")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')                                # cut short by the stop
    T.train(tiny_cfg(tiny_dir, out, steps=6, save_every=3, resume=True))
    assert metric_steps(out) == metric_steps(ref) == [1, 2, 3, 4, 5, 6]
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text()
              .splitlines()]
    ref_losses = [json.loads(line).get("loss") for line in (ref / "metrics.jsonl").read_text()
                  .splitlines()]
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_rotation_never_removes_the_checkpoint_latest_names(tiny_dir, tmp_path, monkeypatch):
    """--resume passed over a damaged step-000008 to step-000006; with --keep-checkpoints 1 and a
    save every step, each save leaves `latest` naming an intact checkpoint (the name-sorted
    rotation used to delete step-000007 right after writing it, and keep the damaged 8)."""
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=8, save_every=2))
    damaged = out / "checkpoints" / "step-000008" / IO.ADAPTER_WEIGHTS_NAME
    damaged.write_bytes(damaged.read_bytes()[:100])
    real_save, seen = T.save_checkpoint, []

    def save_and_check(*args, **kwargs):
        path = real_save(*args, **kwargs)
        seen.append((path.name, T.latest_checkpoint(out) == path))
        return path
    monkeypatch.setattr(T, "save_checkpoint", save_and_check)
    T.train(tiny_cfg(tiny_dir, out, steps=8, save_every=1, keep_checkpoints=1, resume=True))
    assert seen == [("step-000007", True), ("step-000008", True)]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000008"]


def test_checkpoints_are_ordered_by_step_past_step_999999(tiny_dir, tmp_path):
    """From step 1,000,000 on the folder names grow a digit, and 'step-1000000' sorts before
    'step-999999' as text: --resume's fallback and the rotation must order by the step number."""
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2))
    ckpt = out / "checkpoints"
    for name in ("step-999998", "step-999999", "step-1000000", "step-1000001"):
        shutil.copytree(ckpt / "step-000002", ckpt / name)
    shutil.rmtree(ckpt / "step-000002")
    (ckpt / "not-a-step").mkdir()
    damaged = ckpt / "step-1000001" / IO.ADAPTER_WEIGHTS_NAME
    damaged.write_bytes(damaged.read_bytes()[:100])
    (ckpt / "latest").write_text("step-1000001")
    assert T.newest_intact_checkpoint(out, warn=False).name == "step-1000000"
    T.remove_old_checkpoints(ckpt, step=1_000_001, keep=2)     # keeps 1000001 and the newest one
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "not-a-step", "step-1000000",
                                                      "step-1000001"]


def test_a_fresh_run_never_deletes_checkpoints_without_overwrite(tiny_dir, tmp_path):
    """Checkpoint folders without a `latest` pointer are still an earlier run's; and --resume
    with --overwrite is a contradiction, refused before anything runs."""
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2))
    (out / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        T.train(tiny_cfg(tiny_dir, out, steps=2))
    assert (out / "checkpoints" / "step-000002").is_dir()
    with pytest.raises(ValueError, match="give one of them"):
        tiny_cfg(tiny_dir, out, steps=2, resume=True, overwrite=True)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """Checkpoints, configs and exported models are shared and served: a file written atomically
    is readable by others as open() would make it (umask 022: rw-r--r--), not owner-only."""
    import os
    from fileio import write_json, write_safetensors
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})  # (its own temp file)
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    modes = [(tmp_path / name).stat().st_mode & 0o777
             for name in ("a.json", "w.safetensors", "b.txt")]
    assert modes == [0o644, 0o644, 0o644]


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2, save_every=2))
    capsys.readouterr()
    T.train(tiny_cfg(tiny_dir, out, steps=2, save_every=2, resume=True))
    err = capsys.readouterr().err
    assert f"nothing left to train: {out} is at step 2 of 2" in err
    assert metric_steps(out) == [1, 2]


def test_a_run_started_with_overwrite_resumes_with_only_out(tiny_dir, tmp_path):
    """--overwrite is what that invocation did, not a setting of the run: `--resume --out RUN`
    must not read it back (and then refuse --resume with --overwrite)."""
    out = tmp_path / "run"
    out.mkdir()
    T.train(tiny_cfg(tiny_dir, out, steps=2, save_every=2, overwrite=True))
    cfg = T.parse_args(["--resume", "--out", str(out), "--steps", "3"])
    assert cfg.resume and not cfg.overwrite and cfg.steps == 3
    T.train(cfg)
    assert metric_steps(out) == [1, 2, 3]


def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces_and_names_the_path(tmp_path):
    import os
    from fileio import write_json
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    write_json(private, {"x": 1})
    assert private.stat().st_mode & 0o777 == 0o600
    missing = tmp_path / "no-such-folder" / "r.json"
    with pytest.raises(FileNotFoundError) as e:
        write_json(missing, {})
    assert e.value.filename == str(missing)


def test_resume_ends_a_last_metrics_row_that_lost_its_newline(tiny_dir, tmp_path):
    """A stop right before the row's newline: the row is whole and kept, but the resumed run's
    first row must start on a line of its own."""
    out = tmp_path / "run"
    T.train(tiny_cfg(tiny_dir, out, steps=2, save_every=2))
    path = out / "metrics.jsonl"
    path.write_text(path.read_text().rstrip("\n"))
    T.train(tiny_cfg(tiny_dir, out, steps=3, save_every=2, resume=True))
    assert metric_steps(out) == [1, 2, 3]
