"""Using what a run trained: generation with a run's adapter from the command line, the merged HF
model folder (transformers loads it with our logits, every method), the peft export that loads by
itself, --resume with only --out, --epochs and the validation defaults, HF repo ids from the
local cache, and runs written with the older file names."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import adapter_io as IO
import adapters as A
import eval as E
import model as M
import runs
import train as T

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = M.REPO_DIR
TRAIN_DATA = str(REPO / "data" / "wordnet_train.jsonl")
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPT = "Word: owl\nCategory:"


def random_ids(seed=0):
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(seed))


def write_run(tiny_dir, out, method="lora", std=0.3, **options):
    """A run folder as train.py leaves it (adapter, run_config.json), with random adapter tensors
    large enough to change the model's predictions. Returns the model with the adapter."""
    net = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    cfg = A.AdapterConfig(method=method, r=4, targets=TARGETS, total_steps=50, **options)
    torch.manual_seed(0)
    A.apply_method(net, method, cfg)
    if method == "triadapt":                       # grown blocks must survive the merge too
        for layer in list(A.adapter_layers(net).values())[:2]:
            layer.grow()
    with torch.no_grad():
        for p in A.adapter_named_parameters(net).values():
            p.normal_(0, std)
        for layer in A.adapter_layers(net).values():
            if hasattr(layer, "lora_B0"):          # CG-LoRA shift: the subtracted initial step
                layer.lora_A0.normal_(0, std)
                layer.lora_B0.normal_(0, std)
    IO.save_adapter(net, cfg, str(out))
    settings = {"model": str(tiny_dir), "method": method, "chat": False, "weights_dtype": "auto"}
    (out / IO.RUN_CONFIG_NAME).write_text(json.dumps(settings))
    return net.eval()


def generated_text(net, tok, text, **kw):
    return tok.decode(M.generate(net, tok.encode(text, bos=True), 8, eos_id=tok.eos_id,
                                 **kw)).strip()


def stdout_answer(out: str, prompt: str) -> str:
    """What model.py printed after the echoed prompt."""
    return out.split(f"> {prompt}\n", 1)[1].rstrip("\n")


# -------------------------------------------------------------------- generate with an adapter

def test_cli_generates_with_the_runs_adapter_greedy_and_sampled(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    net = write_run(tiny_dir, run)
    tok = M.load_model_and_tokenizer(tiny_dir, torch.float32, "cpu")[1]
    base = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    greedy = generated_text(net, tok, PROMPT)             # the run trained without --chat
    assert greedy != generated_text(base, tok, PROMPT)     # the adapter changes the answer
    r = subprocess.run([sys.executable, str(REPO / "model.py"), "--adapter", str(run),
                        "--prompt", PROMPT, "--max-new-tokens", "8", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert stdout_answer(r.stdout, PROMPT) == greedy
    # sampled, in the checkpoint's chat template (explicit --chat overrides the run's setting)
    runs.main(["--adapter", str(run), "--prompt", PROMPT, "--max-new-tokens", "8", "--chat",
            "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--device", "cpu"])
    sampled = generated_text(net, tok, tok.chat_prompt(PROMPT), temperature=0.9, top_p=0.9,
                             seed=3)
    assert stdout_answer(capsys.readouterr().out, PROMPT) == sampled


def test_cli_generates_with_a_full_finetuning_run(tiny_dir, tmp_path, capsys):
    run = tmp_path / "full"
    T.train(T.TrainConfig(model=str(tiny_dir), method="full", data=TRAIN_DATA, val_data="",
                          out=str(run), steps=2, batch_size=2, lr=1e-2, save_every=0,
                          eval_every=0))
    assert (run / IO.FULL_MODEL_DIR / "model.safetensors").is_file()
    assert json.loads((run / IO.RUN_CONFIG_NAME).read_text())["method"] == "full"
    tuned, tok = M.load_model_and_tokenizer(run / IO.FULL_MODEL_DIR, torch.float32, "cpu")
    runs.main(["--adapter", str(run), "--prompt", PROMPT, "--max-new-tokens", "8"])
    assert stdout_answer(capsys.readouterr().out, PROMPT) == generated_text(tuned, tok, PROMPT)


# ------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("method, options, shard_gb", [
    ("lora", {}, 0.005), ("adalora", {}, None), ("triadapt", {}, None), ("ctr", {}, None),
    ("cg", {}, None), ("cg", {"cg_variant": "shift"}, 0.005)])
def test_merged_folder_loads_in_transformers_with_our_logits(tiny_dir, tmp_path, method,
                                                             options, shard_gb):
    from transformers import AutoTokenizer, LlamaForCausalLM
    run, merged = tmp_path / "run", tmp_path / "merged"
    ours = write_run(tiny_dir, run, method, std=0.05, **options)
    runs.main(["--adapter", str(run), "--merge", str(merged), "--device", "cpu"]
           + (["--max-shard-gb", str(shard_gb)] if shard_gb else []))
    if shard_gb:                       # 5 MB shards: the 12.6 MB embedding gets a file to itself
        index = json.loads((merged / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) >= 2 and not (merged / "model.safetensors").exists()
        assert set(index["weight_map"]) == {k for f in files for k in load_file(merged / f)}
    hf = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    idx = random_ids()
    with torch.no_grad():
        want = ours(idx)
        assert (want - base(idx)).abs().max() > 1e-3                  # the adapter matters
        assert (hf(input_ids=idx).logits - want).abs().max().item() <= 1e-4
    # the tokenizer files came along; our loader reads the folder too
    assert AutoTokenizer.from_pretrained(merged).encode("owl") == \
        AutoTokenizer.from_pretrained(tiny_dir).encode("owl")
    again = M.load_pretrained(merged, torch.float32, "cpu")
    with torch.no_grad():
        assert (again(idx) - want).abs().max().item() <= 1e-4


# --------------------------------------------------------------------- the peft export by itself

def train_from(folder, **kw):
    """train.py started in `folder` (the base model named relative to it, as a user types it)."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        return T.train(T.TrainConfig(**kw))
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "lora"
    train_from(tiny_dir.parent, model=tiny_dir.name, data=TRAIN_DATA, val_data="", out=str(out),
               steps=4, batch_size=4, lr=2e-2, rank=4, targets=",".join(TARGETS), save_every=2,
               keep_checkpoints=5, eval_every=0, dropout=0.1, log_every=1)
    return out


def test_autopeft_loads_the_peft_export_by_itself_with_our_logits(trained_run, tiny_dir):
    """The run named its base relatively (--model tiny0 from tiny0's parent folder); the peft
    export names it so that transformers opens it from anywhere, and so does load_run."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    peft_cfg = json.loads((trained_run / "peft" / IO.PEFT_CONFIG_NAME).read_text())
    assert peft_cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    ours, _, settings = runs.load_run(trained_run, device="cpu")
    assert settings["method"] == "lora" and settings["model"] == tiny_dir.name
    idx = random_ids(1)
    for auto in (AutoPeftModelForCausalLM, AutoModelForCausalLM):
        hf = auto.from_pretrained(trained_run / "peft", dtype=torch.float32).eval()
        with torch.no_grad():
            assert (hf(input_ids=idx).logits - ours(idx)).abs().max().item() <= 1e-5


def test_run_folder_names_do_not_collide_with_hf_and_older_runs_still_load(trained_run, tiny_dir,
                                                                          tmp_path):
    names = {p.name for p in trained_run.iterdir()}
    assert {"adapter.json", "run_config.json", "peft"} <= names
    assert not {"config.json", "adapter_config.json"} & names      # HF's names mean HF's files
    idx = random_ids(2)
    with torch.no_grad():
        want = runs.load_run(trained_run, device="cpu")[0](idx)
    old = tmp_path / "old"                                  # as runs were written before
    shutil.copytree(trained_run, old)
    (old / "adapter.json").rename(old / "adapter_config.json")
    (old / "run_config.json").rename(old / "config.json")
    net, _, settings = runs.load_run(old, device="cpu")
    assert settings == IO.read_run_config(trained_run)
    assert E.saved_ranks(old) == E.saved_ranks(trained_run)
    with torch.no_grad():
        assert torch.equal(net(idx), want)
    # an older --method full run: the HF model folder was the run folder itself
    old_full = tmp_path / "old_full"
    base_dir = tiny_dir
    tuned = M.load_pretrained(base_dir, torch.float32, "cpu")
    M.save_pretrained(tuned.state_dict(), tuned.config, old_full, tokenizer_dir=base_dir)
    assert IO.read_run_config(old_full) == {}              # its config.json is the model's
    with torch.no_grad():
        assert torch.equal(runs.load_run(old_full, device="cpu")[0](idx), tuned(idx))


# ------------------------------------------------------------------------ run ergonomics

def test_eval_takes_the_runs_base_model_and_chat_setting(tiny_dir, tmp_path):
    """eval.py --adapter RUN without --model or --chat: the run's base (the default SmolLM2 would
    not even fit the adapter's shapes) and the run's --chat (here on: prompts in the template)."""
    run = tmp_path / "run"
    net = write_run(tiny_dir, run)
    settings = json.loads((run / IO.RUN_CONFIG_NAME).read_text())
    (run / IO.RUN_CONFIG_NAME).write_text(json.dumps(dict(settings, chat=True)))
    data = str(REPO / "data" / "wordnet_val.jsonl")
    got = E.main(["--adapter", str(run), "--data", data, "--max-examples", "4", "--no-base",
                  "--no-generate", "--device", "cpu"])["wordnet_val.jsonl"]["adapter"]
    tok = M.load_model_and_tokenizer(tiny_dir, torch.float32, "cpu")[1]
    want = {chat: E.evaluate_file(net, tok, data, 256, 16, chat, 4, False)["loss"]
            for chat in (True, False)}
    assert got["loss"] == pytest.approx(want[True], rel=1e-5)
    assert abs(want[True] - want[False]) > 1e-3



def test_resume_with_only_out_reads_the_saved_settings(trained_run, tiny_dir, tmp_path,
                                                       monkeypatch):
    """The run above stopped at step 2 (a copy of that checkpoint) continues with `--resume
    --out` alone, bit for bit; a typed flag that contradicts the saved settings is named."""
    monkeypatch.chdir(tiny_dir.parent)                 # where the run was started
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained_run / "checkpoints" / "step-000002",
                    out / "checkpoints" / "step-000002")
    (out / "checkpoints" / "latest").write_text("step-000002")
    shutil.copy(trained_run / IO.RUN_CONFIG_NAME, out / IO.RUN_CONFIG_NAME)
    with pytest.raises(ValueError, match=r"--resume: --rank 8 \(the run has 4\)"):
        T.main(["--resume", "--out", str(out), "--rank", "8"])
    T.main(["--resume", "--out", str(out), "--log-every", "2"])     # resumable: may change
    want, got = (load_file(str(d / IO.ADAPTER_WEIGHTS_NAME)) for d in (trained_run, out))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [4]


def test_epochs_set_the_steps_and_the_run_start_says_how_the_data_is_covered(tiny_dir, tmp_path,
                                                                             capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Word: w{i}\nCategory:", "completion": " x",
                                        "id": i}) + "\n" for i in range(40)))
    cfg = T.TrainConfig(model=str(tiny_dir), data=str(data), out=str(tmp_path / "run"),
                        epochs=1.5, batch_size=4, grad_accum=2, val_fraction=0.1, rank=2,
                        targets="q_proj", save_every=0, eval_every=0, log_every=1)
    T.validate(cfg)
    with pytest.warns(UserWarning, match="'id'"):
        T.train(cfg)
    err = capsys.readouterr().err
    # 36 training examples (4 held out), 8 per step: 4.5 steps per epoch, 1.5 epochs = 7 steps
    assert "data: 36 examples, 8 per step" in err and "4.5 steps per epoch" in err
    assert "7 steps = 1.56 epochs" in err and "validation: 4 examples" in err
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 7 and any("val_loss" in r for r in rows)


def test_validation_defaults_to_none_unless_the_data_is_the_demos(tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text('{"text": "a"}\n{"text": "b"}\n')
    cfg = T.TrainConfig(data=str(own))
    assert cfg.val_data == "auto" and T.read_datasets(cfg)[1] is None
    demo = T.read_datasets(T.TrainConfig(data=TRAIN_DATA, eval_examples=5))
    assert demo[1] == E.D.load_jsonl(REPO / T.DEMO_VAL_DATA)[:5]
    with pytest.raises(ValueError, match="not both"):
        T.validate(T.TrainConfig(data=str(own), val_data=str(own), val_fraction=0.1))


# ---------------------------------------------------------------------- models by HF repo id

def run_model_cli(env_dir, *args, code=None):
    """model.py (or python -c code) with an HF cache of its own, offline."""
    env = dict(os.environ, HF_HOME=str(env_dir / "home"), HF_HUB_CACHE=str(env_dir / "hub"),
               HF_HUB_OFFLINE="1")
    command = ["-c", code] if code else [str(REPO / "model.py")]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def test_hf_repo_id_without_a_cache_is_a_one_line_error_with_the_download_command(tmp_path,
                                                                                 monkeypatch):
    r = run_model_cli(tmp_path, "--model", "meta-llama/Llama-2-7b-hf")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert ('hf download meta-llama/Llama-2-7b-hf --include "*.json" --include "*.safetensors"'
            in lines[0])
    assert str(tmp_path / "hub") in lines[0]                   # where it looked
    # a preset name not under checkpoints/ gets its repository's command
    monkeypatch.setattr(M, "hf_cache_snapshot", lambda repo_id: None)
    with pytest.raises(M.CheckpointError, match="hf download meta-llama/Meta-Llama-3-8B --incl"):
        M.resolve_checkpoint("llama3-8b")


def test_hf_repo_id_resolves_from_the_local_cache(tiny_dir, tmp_path):
    """A cache laid out as huggingface_hub writes it: the model loads, and files that name their
    base (peft's export) get the repo id."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    code = ("import sys, model, runs; print(model.hf_reference('someone/tiny-llama'));"
            "runs.main(sys.argv[1:])")
    r = run_model_cli(tmp_path, "--model", "someone/tiny-llama", "--prompt", "hi",
                      "--max-new-tokens", "2", "--no-chat", code=code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "someone/tiny-llama"
    assert "loaded someone/tiny-llama" in r.stderr
