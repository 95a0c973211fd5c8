"""Every expected mistake is one line: `error: ...`, exit code 1, no traceback, through the command
lines of train.py, eval.py and model.py.

The entry points run in this process through model.cli, exactly as `python train.py` runs them
(an unexpected exception would escape here as it would print a traceback there), without the
interpreter start-up of a subprocess.
"""
import errno
import json
from pathlib import Path

import pytest
import torch

import eval as E
import model as M
import runs
import train as T
from tests.conftest import write_hf_tiny_with_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_DATA = str(M.REPO_DIR / "data" / "wordnet_train.jsonl")
VAL_DATA = str(M.REPO_DIR / "data" / "wordnet_val.jsonl")


def cli_error(main, argv, capsys) -> str:
    """Run main(argv) as the CLI does; the one `error:` line it ends with."""
    with pytest.raises(SystemExit) as e:
        M.cli(main, argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and len(err[-1]) < 600, err
    assert sum(line.startswith("error") for line in err) == 1
    return err[-1]


def run_flags(tiny_dir, out, *extra):
    return ["--model", str(tiny_dir), "--data", TRAIN_DATA, "--val-data", "", "--out", str(out),
            "--batch-size", "4", "--rank", "2", "--targets", "q_proj,v_proj", "--log-every", "1",
            "--eval-every", "0", *extra]


# ------------------------------------------------------------------------------- numeric flags

@pytest.mark.parametrize("flags, named", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be positive"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (["--clip", "nan"], "--clip must be a finite number"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["--save-every", "-5"], "--save-every must be at least 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be at least 1"),
    (["--method", "full", "--alpha", "inf"], "--alpha must be a finite number"),
    (["--method", "ctr", "--ctr-rho", "nan"], "--ctr-rho must be a finite number"),
    (["--method", "cg", "--cg-kappa0", "inf"], "--cg-kappa0 must be a finite number"),
    (["--method", "adalora", "--beta1", "nan"], "--beta1 must be a finite number"),
])
def test_numeric_flags_must_be_finite_and_in_range(flags, named, capsys):
    """Checked when parsed (argparse takes 'nan' for a float, and NaN passes every `<=` test)."""
    assert named in cli_error(T.parse_args, ["--data", TRAIN_DATA, *flags], capsys)


@pytest.mark.parametrize("flags, line", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["--max-examples", "0"], "--max-examples must be at least 1, got 0"),
    (["--no-base"], "--no-base without --adapter leaves nothing to evaluate; give --adapter RUN, "
                    "or drop --no-base"),
    (["--trust-region-plot", "tr.png"], "--trust-region-plot needs --adapter RUN (a CTR-LoRA run "
                                        "folder)"),
    (["--rank-heatmap", "r.png"], "--rank-heatmap needs --adapter RUN (an AdaLoRA, CTR-LoRA or "
                                  "TriAdaptLoRA run folder)"),
])
def test_eval_flags_out_of_range(flags, line, tiny_dir, capsys):
    """Checked before the model loads (a negative --batch-size made no batch: loss 0; --no-base
    alone printed an empty table)."""
    argv = ["--model", str(tiny_dir), "--data", VAL_DATA, "--no-generate", *flags]
    assert cli_error(E.main, argv, capsys) == f"error: {line}"


@pytest.mark.parametrize("flags, line", [
    (["--temperature", "-0.5"], "--temperature must be at least 0 (0 = greedy), got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "-0.1", "--temperature", "0.7"], "--top-p must be in (0, 1], got -0.1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be a finite number, got nan"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-shard-gb", "0"], "--max-shard-gb must be > 0, got 0.0"),
    (["--max-shard-gb", "inf"], "--max-shard-gb must be a finite number, got inf"),
    (["--merge", "merged"], "--merge needs --adapter RUN (the run whose adapter is merged into its "
                            "base)"),
])
def test_model_py_flags_out_of_range(flags, line, tiny_dir, capsys):
    """Checked before the model loads. Unchecked, a negative --top-p with sampling left no
    token to draw and --temperature nan drew from NaN probabilities (torch tracebacks), and
    --max-shard-gb inf overflowed int() (a traceback)."""
    argv = ["--model", str(tiny_dir), "--max-new-tokens", "2", *flags]
    assert cli_error(runs.main, argv, capsys) == f"error: {line}"


# ----------------------------------------------------------------------- files and devices

def test_a_directory_given_as_a_data_file(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    msg = cli_error(T.main, run_flags(tiny_dir, tmp_path / "o") + ["--data", str(folder)], capsys)
    assert "is a directory, not a data file" in msg
    msg = cli_error(T.main, run_flags(tiny_dir, tmp_path / "o", "--val-data", str(folder)), capsys)
    assert msg.startswith("error: --val-data ") and "is a directory, not a data file" in msg
    msg = cli_error(E.main, ["--model", str(tiny_dir), "--data", str(folder), "--no-generate"],
                    capsys)
    assert str(folder) in msg and "is a directory" in msg


def test_an_out_path_that_is_a_file_or_under_one_is_named(tiny_dir, tmp_path, capsys):
    """mkdir on a file (FileExistsError) or under one (NotADirectoryError): one line with the
    path and what to do; the file is left as it was."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    msg = cli_error(T.main, run_flags(tiny_dir, a_file, "--steps", "1"), capsys)
    assert msg == (f"error: {a_file}: is a file where a folder is needed; move it away or choose "
                   f"another path")
    msg = cli_error(T.main, run_flags(tiny_dir, a_file / "run", "--steps", "1"), capsys)
    assert msg.startswith(f"error: {a_file / 'run'}: a part of this path is a file, not a folder")
    assert a_file.read_text() == "keep me"


def test_an_out_path_without_permission_is_named(tiny_dir, tmp_path, monkeypatch, capsys):
    """(The tests may run as root, whom no mode bit stops: the refusal is simulated.)"""
    out = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    msg = cli_error(T.main, run_flags(tiny_dir, out, "--steps", "1"), capsys)
    assert msg.startswith(f"error: {out}: permission denied; choose a path you may use")


class FillingDisk:
    """A text file on a disk that fills up after `room` characters: a larger write puts what fits,
    then raises ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, text):
        if len(text) > self.room:
            self.f.write(text[:self.room])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
        self.room -= len(text)
        return self.f.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_while_eval_writes_out_leaves_the_previous_results(tiny_dir, tmp_path,
                                                                        monkeypatch, capsys):
    """The disk fills up while eval.py writes --out: one line, and the results file of the last
    run is still whole (pathlib and the builtin open both go through the patched opener, so the
    test holds whichever way the file is written)."""
    import builtins
    import io
    folder = tmp_path / "results"
    folder.mkdir()
    out = folder / "results.json"
    argv = ["--model", str(tiny_dir), "--data", VAL_DATA, "--max-examples", "2", "--no-generate",
            "--out", str(out)]
    E.main(argv)
    before = out.read_text()
    assert "loss" in json.loads(before)["wordnet_val.jsonl"]["base"]
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        in_folder = isinstance(file, (str, Path)) and Path(file).parent == folder
        return FillingDisk(f, 20) if in_folder and "w" in mode and "b" not in mode else f
    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)
    msg = cli_error(E.main, argv, capsys)
    monkeypatch.undo()
    assert msg.startswith("error: no space left on the device")
    assert out.read_text() == before
    assert [p.name for p in folder.iterdir()] == ["results.json"]        # no temporary file left


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "no space left on the device; free some space and run again"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/.r.json.tmp", None, "/tmp/results"),
     "/tmp/results: is a folder, not a file; give a file path"),
    (FileNotFoundError("--resume: no checkpoint in runs/x"), "--resume: no checkpoint in runs/x"),
    (OSError(errno.EIO, "Input/output error"), None),          # no path: a bug, not the user's
])
def test_os_errors_on_the_users_paths_are_one_line_and_others_are_not_hidden(error, line):
    assert M.os_error_line(error) == line


def test_a_conversation_the_chat_template_refuses_is_one_line(tiny_dir, tmp_path, capsys):
    """A template's raise_exception (here: the first message must be the user's) while eval.py
    encodes a chat file: the file, the record and the template's message."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the "
                             "conversation must start with the user') }}{% endif %}"
                             "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hello there"},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "How can I help?"}]})
                    + "\n")
    msg = cli_error(E.main, ["--model", str(model), "--data", str(chat), "--no-generate"], capsys)
    assert msg.startswith(f"error: {chat}: the record starting 'Hello there': the chat template")
    assert "(the conversation must start with the user)" in msg


def device_argv(main, tiny_dir) -> list[str]:
    """The rest of a command line of train.py (parsing only), eval.py or model.py."""
    return {T.parse_args: ["--data", TRAIN_DATA],
            E.main: ["--model", str(tiny_dir), "--data", VAL_DATA],
            runs.main: ["--model", str(tiny_dir)]}[main]


@pytest.mark.parametrize("main", [T.parse_args, E.main, runs.main])
def test_an_unknown_device_is_named(main, tiny_dir, capsys):
    argv = device_argv(main, tiny_dir) + ["--device", "gpu"]
    assert "--device 'gpu' is not a device name" in cli_error(main, argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("main", [T.parse_args, E.main, runs.main])
def test_cuda_without_a_gpu_says_so(main, tiny_dir, capsys):
    msg = cli_error(main, device_argv(main, tiny_dir) + ["--device", "cuda"], capsys)
    assert "--device cuda: CUDA is not available here" in msg and "--device cpu" in msg


# ------------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def run_with_checkpoints(tiny_dir, tmp_path):
    """A 4-step LoRA run with checkpoints at steps 2 and 4 (latest)."""
    out = tmp_path / "run"
    T.main(run_flags(tiny_dir, out, "--steps", "4", "--save-every", "2", "--keep-checkpoints",
                     "5"))
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damaged", ["adapter.safetensors", "trainer_state.pt", "adapter.json"])
def test_resume_passes_over_a_damaged_latest_checkpoint(run_with_checkpoints, tiny_dir, damaged,
                                                        capsys):
    """A truncated file in the latest checkpoint: --resume warns, names the file, and continues
    from the newest checkpoint whose files all read back."""
    out = run_with_checkpoints
    truncate(out / "checkpoints" / "step-000004" / damaged)
    capsys.readouterr()
    T.main(run_flags(tiny_dir, out, "--steps", "6", "--save-every", "2", "--keep-checkpoints",
                     "5", "--resume"))
    err = capsys.readouterr().err
    assert f"warning: step-000004 is damaged ({damaged} (" in err
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-4:] == [3, 4, 5, 6]


def test_resume_with_every_checkpoint_damaged_is_one_line(run_with_checkpoints, tiny_dir,
                                                           capsys):
    out = run_with_checkpoints
    for step in ("step-000002", "step-000004"):
        truncate(out / "checkpoints" / step / "adapter.safetensors")
    msg = cli_error(T.main, run_flags(tiny_dir, out, "--steps", "6", "--resume"), capsys)
    assert "no intact checkpoint" in msg and "step-000002 is damaged" in msg
    assert "--overwrite" in msg


def test_eval_of_a_damaged_adapter_names_the_file_and_an_intact_checkpoint(run_with_checkpoints,
                                                                           tiny_dir, capsys):
    out = run_with_checkpoints
    truncate(out / "adapter.safetensors")
    msg = cli_error(E.main, ["--model", str(tiny_dir), "--adapter", str(out), "--data", VAL_DATA,
                             "--no-base"], capsys)
    assert "adapter.safetensors (" in msg and "truncated or corrupt" in msg
    good = out / "checkpoints" / "step-000004"
    assert f"pass --adapter {good}" in msg


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_model_py_with_a_damaged_adapter_is_one_line(run_with_checkpoints, tiny_dir, damage,
                                                      capsys):
    """model.py --adapter (generation, sampling on) with a truncated adapter.safetensors, or one
    holding a NaN (write_safetensors never writes one: it is damage): one line naming the file."""
    from safetensors.torch import load_file, save_file
    weights = run_with_checkpoints / "adapter.safetensors"
    if damage == "truncated":
        truncate(weights)
    else:
        tensors = load_file(weights)
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] = float("nan")
        save_file(tensors, weights)
    msg = cli_error(runs.main, ["--adapter", str(run_with_checkpoints), "--max-new-tokens", "2",
                                "--temperature", "0.7"], capsys)
    assert msg.startswith(f"error: {weights}: ") and "corrupt" in msg
    if damage == "nan":                                     # (was: loaded, and generated from)
        assert f"tensor {first} holds NaN/inf" in msg


def test_an_adapter_on_another_base_says_which_base(run_with_checkpoints, tiny_dir, smollm2_dir,
                                                    tmp_path, capsys):
    """Trained on tiny_dir (intermediate size 128), evaluated on a base with 96: the line names
    both shapes and the base to use."""
    other = write_hf_tiny_with_tokenizer(tmp_path / "other", 1, smollm2_dir)
    msg = cli_error(E.main, ["--model", str(other), "--adapter", str(run_with_checkpoints),
                             "--data", VAL_DATA, "--no-base"], capsys)
    assert "this adapter was trained on" in msg and str(tiny_dir) in msg
    assert "intermediate_size 128" in msg and "intermediate_size 96" in msg
    assert f"--model {tiny_dir}" in msg and len(msg) < 400
