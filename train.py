"""
Fine-tune a Llama-architecture model with an adapter method (or fully), in one readable loop.

    python train.py --method lora --model smollm2-135m --data data/wordnet_train.jsonl --steps 100
    python train.py --method lora --model llama-7b --device cuda --grad-checkpoint ...
    torchrun --nproc_per_node 2 train.py --method triadapt ...   (DDP: nccl on GPUs, gloo on CPU)

The loop, top to bottom (each method-specific call is visible where it happens):

    for step in steps:
        micro-batches <- data cursor          (grad_accum of them; label tokens counted first)
        loss = sum_t CE_t / N_label_tokens + method.regularizer()
                                              (regularizer: AdaLoRA / TriAdaptLoRA orthogonality)
        backward (under DDP: the adapters' gradients are all-reduced)
        if the loss or a gradient is NaN/inf: drop the step (gradients cleared, RNG rewound)
            method.skip_step(step)            (CTR-LoRA forgets the step's statistics; a growth due
                                               now happens on the last good state, CTR-LoRA's
                                               allocation waits for the next good step)
        else: clip grad norm
            method.before_optimizer_step(...) (CTR-LoRA: fold curvature statistics, snapshot)
            optimizer.step() with per-group LR (warm-up from the group's start step, cosine decay)
            method.after_optimizer_step(step) (CTR-LoRA allocator + trust region, AdaLoRA masking,
                                               TriAdaptLoRA growth)
        log / evaluate / checkpoint

Checkpoints hold the adapter (safetensors), optimizer, LR groups, RNG and data-cursor state, so
`--resume` continues exactly; they are written to a temporary folder and renamed, so an
interruption never leaves a broken one. SIGINT/SIGTERM finish the current step, save a checkpoint
and exit. A dropped (NaN/inf) step leaves no trace but the batch it drew and its step number.
Nothing NaN/inf is ever written (such a save is refused; the checkpoints on disk stay), and
--resume falls back to the newest checkpoint whose files all read back.

Under torchrun every rank runs this same loop on its own slice of each global batch (Batcher
rank/world_size); DistributedDataParallel all-reduces the gradients of the trainable parameters
only, statistics that drive rank decisions (CTR-LoRA's curvature) are all-reduced by the method
hooks, so every rank takes identical decisions; only rank 0 writes checkpoints, metrics and plots.
--batch-size is per rank: the global batch is batch_size x ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import adapter_io as IO
import adapters as A
import data as D
import eval as E
import memory
import model as M
from adapter_config import option
from fileio import atomic_write, first_nonfinite, unreadable_files, write_json
from tokenizer import load_tokenizer

# --------------------------------------------------------------------------------------------------
# configuration: one dataclass; the command line is generated from it (every field has a help text)
# --------------------------------------------------------------------------------------------------

ALL_LINEARS = ",".join(A.LLAMA_LINEAR_NAMES)
DEMO_DATA, DEMO_VAL_DATA = "data/wordnet_train.jsonl", "data/wordnet_val.jsonl"


@dataclass
class TrainConfig:
    model: str = option("smollm2-135m", "checkpoint folder or name under checkpoints/")
    method: str = option("lora", "adapter method: " + ", ".join(A.METHODS) +
                         "; or 'full' (all weights, small models: a reference run)")
    data: str = option(DEMO_DATA,
                       "training data: JSONL, or a JSON array (formats: README, data.py)")
    val_data: str = option("auto", "validation data for the loss logged every --eval-every "
                           "steps: a file, '' for none, or auto: the demo's validation file "
                           "when --data is the demo's, else none (or --val-fraction)")
    val_fraction: float = option(0.0, "hold out this fraction of --data (drawn with --seed) as "
                                 "the validation data, instead of a --val-data file")
    out: str = option("runs/lora", "output folder: adapter, peft/, metrics.jsonl, plots")
    steps: int = option(100, "optimizer steps")
    epochs: float = option(0.0, "passes over --data to train for, instead of --steps (0: use "
                           "--steps); the run start prints the steps per epoch")
    batch_size: int = option(8, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(256, "maximum tokens per example (longer ones are cut, with a warning)")
    lr: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr * this")
    warmup_steps: int = option(10, "linear warm-up steps (restarted for parameter groups added "
                               "mid-run)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "gradient-norm clipping threshold (0 = off)")
    rank: int = option(8, "adapter rank r (reference / initial rank for adaptive methods)")
    alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = option(0.0, "dropout on the adapter input")
    targets: str = option(ALL_LINEARS, "comma-separated linear names to adapt")
    chat: bool = option(False, "wrap prompts in the checkpoint's chat template (chat 'messages' "
                        "records always use it)")
    seed: int = option(0, "seed for adapter init, dropout and data order")
    device: str = option("", "cpu or cuda (default: cuda if available)")
    threads: int = option(0, "CPU threads for torch (0 = torch's default, one per core; on a "
                          "machine shared with other jobs, 1 per process can be several times "
                          "faster)")
    weights_dtype: str = option("auto", "storage dtype of the frozen weights: auto (bf16 on a "
                                "bf16 GPU, fp32 on CPU), float32, or bfloat16 (half the memory; "
                                "on CPU each block is computed in fp32 — how a 7B model trains "
                                "in 24 GB of RAM)")
    grad_checkpoint: bool = option(False, "recompute each block in backward (saves activation "
                                   "memory; on by default on CUDA)")
    compile: bool = option(False, "torch.compile the transformer block for training steps "
                           "(inductor fuses the elementwise work; on CPU, SmolLM2 LoRA steps ran "
                           "4-10%% faster with 16%% less peak memory, after a first step that "
                           "compiles for 5-30 s; needs a C++ compiler). For lora, adalora, cg "
                           "and full; not for ctr (curvature hooks inside the blocks) or "
                           "triadapt (growth changes the blocks' structure)")
    log_every: int = option(5, "progress line and metrics every N steps")
    eval_every: int = option(50, "validation loss every N steps (0 = only at the end)")
    eval_examples: int = option(200, "validation examples used for the loss")
    save_every: int = option(50, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in --out, with the "
                          "settings saved there (--resume --out RUN is the whole command)")
    overwrite: bool = option(False, "start afresh in an --out that holds an earlier run's "
                             "checkpoints (they are replaced)")
    max_nonfinite: int = option(20, "abort after this many consecutive NaN/inf losses")
    dry_run: bool = option(False, "print the memory estimate of this run (weights, adapters, "
                           "optimizer, method state, activations with/without checkpointing, "
                           "logits; every method) without loading weights, and exit")

    method_options: dict = field(default_factory=dict, metadata={
        "help": "method hyper-parameters: the AdapterConfig fields below, one flag each"})

    def adapter_config(self) -> A.AdapterConfig:
        # the rank schedules need the run's total steps T
        derived = {"total_steps": self.steps} if "total_steps" in ADAPTER_FIELD_NAMES else {}
        return A.AdapterConfig(method=self.method, r=self.rank, alpha=self.alpha,
                               dropout=self.dropout, targets=self.targets, **derived,
                               **self.method_options)


# AdapterConfig fields that TrainConfig spells differently; every other AdapterConfig field (the
# hyper-parameters of AdaLoRA, TriAdaptLoRA, CTR-LoRA, CG-LoRA) becomes a flag of its own, with
# the help text from its metadata.
SHARED_ADAPTER_FIELDS = {"method", "r", "alpha", "dropout", "targets", "total_steps"}
ADAPTER_FIELD_NAMES = {f.name for f in fields(A.AdapterConfig)}


def method_option_fields():
    return [f for f in fields(A.AdapterConfig) if f.name not in SHARED_ADAPTER_FIELDS]


# the settings a resumption may change; everything else must match the checkpoint
RESUMABLE_CHANGES = {"out", "steps", "resume", "overwrite", "log_every", "eval_every", "save_every",
                     "keep_checkpoints", "device", "eval_examples", "max_nonfinite", "dry_run",
                     "threads", "compile", "epochs"}
# what this invocation does, never read back from the saved settings
PER_INVOCATION = {"resume", "overwrite", "dry_run"}


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    if args["resume"]:      # the flags typed on the command line, defaults left out
        explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
        args = settings_for_resume(args, explicit)
    options = {f.name: args.pop(f.name) for f in method_option_fields()}
    defaults = A.AdapterConfig()
    cfg = TrainConfig(**args, method_options={k: v for k, v in options.items()
                                              if v != getattr(defaults, k)})
    validate(cfg)
    return cfg


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line, one flag per field; suppress_defaults leaves a flag that is not typed out
    of the parsed namespace (how --resume tells typed flags from defaults)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(ap, [f for f in fields(TrainConfig) if f.name != "method_options"], suppress_defaults)
    group = ap.add_argument_group("method hyper-parameters (used by the methods that name them)")
    add_flags(group, method_option_fields(), suppress_defaults)
    return ap


def settings_for_resume(args: dict, explicit: set[str]) -> dict:
    """--resume continues with the settings the run saved in --out (run_config.json), so that
    `--resume --out RUN` is the whole command. A typed flag that may change on resume
    (RESUMABLE_CHANGES: --steps, --device, ...) replaces the saved value; any other typed flag
    must equal it, else the error names the flag. Without saved settings: the flags as typed."""
    saved = IO.read_run_config(args["out"])
    if not saved:
        return args
    saved_options = saved.get("method_options", {})
    option_names = {f.name for f in method_option_fields()}
    defaults = A.AdapterConfig()
    merged, conflicts = {}, []
    for name, value in args.items():
        if name in option_names:
            saved_value = saved_options.get(name, getattr(defaults, name))
        elif name in PER_INVOCATION:
            saved_value = value                 # (a run started with --overwrite still resumes)
        else:
            saved_value = saved.get(name, value)
        if name in explicit and name not in RESUMABLE_CHANGES and value != saved_value:
            conflicts.append(f"--{name.replace('_', '-')} {value!r} (the run has {saved_value!r})")
        merged[name] = value if name in explicit else saved_value
    if conflicts:
        raise ValueError(f"--resume: {'; '.join(conflicts)}: not the settings saved in "
                         f"{args['out']}; drop the flag to continue the run as it was, or start a "
                         f"new --out")
    if "steps" in explicit and "epochs" not in explicit:
        merged["epochs"] = 0.0                           # a typed --steps replaces a saved --epochs
    return merged


def add_flags(ap, flds, suppress_defaults: bool = False):
    """One --flag per dataclass field: bools get --x/--no-x, the rest their type; help from the
    field's metadata."""
    for f in flds:
        flag = "--" + f.name.replace("_", "-")
        tname = f.type if isinstance(f.type, str) else f.type.__name__
        default = f.default_factory() if callable(f.default_factory) else f.default
        default = argparse.SUPPRESS if suppress_defaults else default
        help_text = f.metadata.get("help", "")
        if tname == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
        elif tname in ("int", "float", "str"):
            ap.add_argument(flag, type={"int": int, "float": float, "str": str}[tname],
                            default=default, help=help_text)
        elif tname.startswith("list"):
            ap.add_argument(flag, type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                            default=default, help=help_text + " (comma-separated)")
        else:
            raise TypeError(f"field {f.name} of type {tname} has no command-line form")


# methods whose blocks torch.compile cannot serve with one graph
COMPILE_UNSUPPORTED = {"ctr": "its curvature hooks run inside every block on every step",
                       "triadapt": "its modules grow to different structures, each needing its own "
                                   "graph: the compiler would stop after 8 and run the rest eager"}


# the smallest value of each numeric flag (every float must also be finite)
AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "log_every": 1, "rank": 1,
            "eval_examples": 1, "keep_checkpoints": 1, "max_nonfinite": 1, "warmup_steps": 0,
            "eval_every": 0, "save_every": 0, "threads": 0, "weight_decay": 0.0, "clip": 0.0,
            "min_lr_ratio": 0.0}


def check_numbers(cfg: TrainConfig) -> None:
    """Every numeric flag finite and in its range, or a ValueError naming the flag (argparse takes
    'nan' and 'inf' as floats, and a NaN passes every `<` test)."""
    flag = lambda name: "--" + name.replace("_", "-")
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")
    for name, lowest in AT_LEAST.items():
        if getattr(cfg, name) < lowest:
            raise ValueError(f"{flag(name)} must be at least {lowest}, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.min_lr_ratio > 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.alpha <= 0:                                  # (AdapterConfig checks these two again)
        raise ValueError(f"--alpha must be > 0, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")


def validate(cfg: TrainConfig):
    if cfg.method != "full" and cfg.method not in A.METHODS:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of: "
                         f"{', '.join(A.METHODS)}, full")
    check_numbers(cfg)
    if cfg.method != "full":
        if not cfg.epochs:                     # (with --epochs: in train, once the steps are known)
            cfg.adapter_config()               # validates the method's hyper-parameters now
    elif cfg.weights_dtype not in ("auto", "float32"):
        raise ValueError("--method full trains fp32 master weights; drop --weights-dtype (or use "
                         "float32)")
    M.weights_dtype_policy(cfg.weights_dtype, "cpu")      # an unknown --weights-dtype fails here
    M.parse_device(cfg.device, need_present=not cfg.dry_run)   # (a dry run may plan for a GPU)
    if cfg.compile and cfg.method in COMPILE_UNSUPPORTED:
        raise ValueError(f"--compile does not support --method {cfg.method} "
                         f"({COMPILE_UNSUPPORTED[cfg.method]}); drop --compile")
    for name in ("data", "val_data") if not cfg.dry_run else ():   # ('' = none, auto: see below)
        path = getattr(cfg, name)
        if (path or name == "data") and path != "auto" and not Path(path).is_file():
            folder = bool(path) and Path(path).is_dir()
            what = "is a directory, not a data file" if folder else "no such file"
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path!r}: {what}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again: "
                         "give one of them")
    validate_data_options(cfg)


def validate_data_options(cfg: TrainConfig):
    if cfg.epochs < 0:
        raise ValueError("--epochs must be positive (or 0 to use --steps)")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction} must be in [0, 1), e.g. 0.05")
    if cfg.val_fraction and cfg.val_data not in ("auto", ""):
        raise ValueError("give --val-data FILE or --val-fraction, not both")


# --------------------------------------------------------------------------------------------------
# learning rate: warm-up from each parameter group's own start step, cosine decay over the whole run
# --------------------------------------------------------------------------------------------------

def lr_at(step: int, group_start: int, cfg: TrainConfig) -> float:
    """lr(t) = lr · warmup(t − t_group) · decay(t); groups added mid-run (TriAdaptLoRA growth)
    restart warm-up."""
    warm = min(1.0, (step - group_start + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    progress = min(1.0, step / max(1, cfg.steps - 1))
    decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm * decay


def set_lrs(optimizer, step: int, cfg: TrainConfig):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, group["start_step"], cfg)


# --------------------------------------------------------------------------------------------------
# checkpoints: <out>/checkpoints/{step-000100/{adapter..., trainer_state.pt}, latest}
# --------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(net, cfg: TrainConfig, folder: Path):
    """The trained weights: the adapter for adapter methods, the whole model for --method full."""
    if cfg.method == "full":                 # a complete checkpoint folder, tokenizer included
        M.save_pretrained(net.state_dict(), net.config, folder,
                          tokenizer_dir=M.resolve_checkpoint(cfg.model))
    else:
        IO.save_adapter(net, cfg.adapter_config(), str(folder), base_model_name_or_path=cfg.model)


def read_datasets(cfg: TrainConfig) -> tuple[list, list | None, str]:
    """(training records, validation records or None, the validation data's name). Validation is
    --val-data, or --val-fraction of --data held out, or for the demo's --data (val-data auto) the
    demo's validation file; otherwise none, so that val_loss is never measured on other data."""
    train_records = D.load_jsonl(cfg.data)
    if cfg.val_fraction:
        train_records, val_records = D.split_validation(train_records, cfg.val_fraction, cfg.seed)
        name = f"{cfg.data} (held out: {cfg.val_fraction:g})"
    elif cfg.val_data == "auto":
        is_demo = Path(cfg.data).resolve() == (M.REPO_DIR / DEMO_DATA).resolve()
        name = str(Path(cfg.data).with_name(Path(DEMO_VAL_DATA).name)) if is_demo else ""
        val_records = D.load_jsonl(name) if name else None
    else:
        name = cfg.val_data
        val_records = D.load_jsonl(name) if name else None
    return train_records, val_records[:cfg.eval_examples] if val_records else None, name


def steps_from_epochs(cfg: TrainConfig, n_examples: int, world: int) -> str:
    """Set cfg.steps from --epochs (when given), and the line that tells how the run covers the
    data: examples, steps per epoch, epochs. One epoch is the Batcher's: n // (batch x processes)
    micro-batches (the leftover is skipped), grad_accum of them per step."""
    micro_per_epoch = n_examples // (cfg.batch_size * world)
    steps_per_epoch = micro_per_epoch / cfg.grad_accum
    if cfg.epochs:
        cfg.steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    per_step = cfg.batch_size * cfg.grad_accum * world
    return (f"data: {n_examples} examples, {per_step} per step (batch {cfg.batch_size} x "
            f"accumulation {cfg.grad_accum} x {world} processes): {steps_per_epoch:g} steps per "
            f"epoch; {cfg.steps} steps = {cfg.steps / max(steps_per_epoch, 1e-9):.2f} epochs")


def save_checkpoint(out: Path, step: int, net, optimizer, batcher, cfg: TrainConfig, extra: dict):
    """Write the checkpoint into a temporary folder, rename it into place, point `latest` at it.

    Refused before anything is written if a tensor is NaN/inf; a failed write removes its
    temporary folder. Either way the checkpoints already there, and `latest`, stay."""
    check_finite_before_saving(out, step, net, optimizer, cfg, extra.get("method"))
    ckpt_dir = out / "checkpoints"
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(net, cfg, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "group_starts": [g["start_step"] for g in optimizer.param_groups],
                    "rng": rng_state(), "data": batcher.state_dict(), "config": asdict(cfg),
                    **extra}, tmp / "trainer_state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(ckpt_dir / "latest", lambda p: Path(p).write_text(final.name))
    remove_old_checkpoints(ckpt_dir, step, cfg.keep_checkpoints)
    return final


def remove_old_checkpoints(ckpt_dir: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the newest keep − 1 before it. A folder of a later step
    (a damaged one that --resume passed over) stays until the run writes that step again."""
    older = [p for p in checkpoint_folders(ckpt_dir) if checkpoint_step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def check_finite_before_saving(out: Path, step: int, net, optimizer, cfg: TrainConfig,
                               method_state: dict | None = None) -> None:
    """FloatingPointError, naming the step, the tensor and the likely cause, if the weights, the
    optimizer state or the method's state (statistics, scores, calibration) hold NaN/inf (the
    loop never applies a NaN/inf step, but a too-large --lr can overflow the weights
    themselves)."""
    tensors = dict(net.state_dict() if cfg.method == "full" else A.adapter_state_dict(net))
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer {key} of parameter {index}": value
                        for key, value in state.items() if torch.is_tensor(value)})
    tensors.update(named_numbers(method_state or {}, f"{cfg.method} state"))
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise FloatingPointError(f"step {step}: {bad} holds NaN/inf, so nothing was saved (the run "
                                 f"diverged: --lr {cfg.lr:g} too high?); {checkpoints_kept(out)}")


def named_numbers(obj, name: str) -> dict[str, torch.Tensor]:
    """The tensors and floats of a nested dict/list, by path ('ctr state/curvature/…/s')."""
    if isinstance(obj, float):
        obj = torch.tensor(obj, dtype=torch.float64)
    if torch.is_tensor(obj):
        return {name: obj}
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(named_numbers(value, f"{name}/{key}"))
    return out


def checkpoints_kept(out: Path) -> str:
    last = latest_checkpoint(out)
    return (f"the checkpoints in {last.parent} are untouched (latest: {last.name})" if last
            else "no checkpoint was written")


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder is named after: step-000100 -> 100."""
    return int(path.name.removeprefix("step-"))


def checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    """The step-N folders of `ckpt_dir`, oldest first, ordered by N: past step 999,999 the names
    grow a digit and no longer sort as text. Folders not named step-<digits> are left alone."""
    folders = [p for p in ckpt_dir.glob("step-*")
               if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(folders, key=checkpoint_step)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def newest_intact_checkpoint(out: Path, warn: bool = True) -> Path:
    """The checkpoint --resume continues from: the one `latest` names if every file of it reads
    back whole, else the newest one that does, with a warning naming what was passed over and why
    (a file truncated or corrupted on disk after it was written)."""
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(out)
    older = [p for p in reversed(checkpoint_folders(ckpt_dir)) if p != latest]
    passed_over = []
    for ckpt in ([latest] if latest else []) + older:
        problems = ([] if (ckpt / "trainer_state.pt").is_file() else ["trainer_state.pt missing"])
        problems += unreadable_files(ckpt)
        if not problems:
            if passed_over and warn:
                print(f"warning: {'; '.join(passed_over)}: resuming from {ckpt}", file=sys.stderr)
            return ckpt
        passed_over.append(f"{ckpt.name} is damaged ({', '.join(problems)})")
    if not passed_over:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}; drop --resume to start "
                                f"fresh")
    raise M.CheckpointError(f"--resume: no intact checkpoint in {ckpt_dir}: "
                            f"{'; '.join(passed_over)}; start again with --overwrite")


def check_resume_config(saved: dict, cfg: TrainConfig):
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in asdict(cfg).items()
             if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diffs:
        raise ValueError("cannot resume with different settings (" + "; ".join(diffs) + "); "
                         "use the original flags or a new --out")


# --------------------------------------------------------------------------------------------------
# several processes: torchrun + DistributedDataParallel (nccl on CUDA, gloo on CPU)
# --------------------------------------------------------------------------------------------------

def init_distributed(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world_size). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them
    this is one process."""
    device = torch.device(cfg.device or M.default_device())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":                          # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over all ranks, in place, with one collective (they are packed into one
    float64 buffer, on the GPU under NCCL, which takes no CPU tensor: a method may keep small
    counters on the CPU)."""
    if not tensors or not dist.is_initialized():
        return
    where = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.detach().reshape(-1).to(where, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def wrap_ddp(net, device, world: int):
    """DDP around the model, or the model itself in one process.

    Only parameters that require grad (the adapters) are in DDP's gradient buckets: the frozen
    base weights are never all-reduced. Rank 0's trainable values are broadcast here
    (init_sync=False skips DDP's broadcast of every parameter and buffer, i.e. of the whole frozen
    model); buffers are not re-broadcast at each forward, since every rank sets them by the same
    decisions (masks) from the same all-reduced statistics. Gradient checkpointing is non-reentrant
    (model.py), so each parameter's gradient is ready exactly once per backward under DDP.
    """
    if world == 1:
        return net
    for p in net.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)
    return DistributedDataParallel(net,
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, init_sync=False)


def rank_rng_states(world: int) -> dict:
    """Every rank's RNG state, for a checkpoint (dropout draws differ per rank); call on all ranks
    together."""
    if world == 1:
        return {}
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return {"rng_ranks": states}


# --------------------------------------------------------------------------------------------------
# the run: set-up, the loop, and what it leaves behind
# --------------------------------------------------------------------------------------------------

class StopFlag:
    """SIGINT/SIGTERM set the flag; the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:               # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step",
              file=sys.stderr)


def build_model(cfg: TrainConfig, device):
    """Load the base model, then (seeded) build the adapters and freeze everything else."""
    full = cfg.method == "full"
    # (storage, compute): compute is fp32 for bf16 storage on CPU
    dtype, compute = M.weights_dtype_policy(cfg.weights_dtype, device)
    if full:
        dtype = torch.float32                  # full fine-tuning keeps fp32 master weights
    net, tok = M.load_model_and_tokenizer(cfg.model, dtype, device, compute_dtype=compute)
    torch.manual_seed(cfg.seed)                # adapter init depends on the seed, nothing else
    if full:
        for p in net.parameters():
            p.requires_grad_(True)
    else:
        A.apply_method(net, cfg.method, cfg.adapter_config())
        net.to(device)
    return net, tok


def accumulate_gradients(net, micro: list[dict], n_label: int, device, autocast=None, method=None,
                         world: int = 1) -> float:
    """Backward over micro-batches: the gradient equals that of one batch holding all of them.

    loss = (Σ over every label token t of the step of CE_t) / n_label, where n_label counts the
    label tokens of *all* micro-batches. Averaging per micro-batch instead would weight a token by
    1/len(its micro-batch). The method's regularizer joins the last micro-batch's loss (same
    gradient as a separate backward; under DDP it keeps the step at one backward per micro-batch).
    Returns this process's share of the loss (a float, for logging). `method.before_micro_batch`
    tells curvature collectors (CTR-LoRA) which tokens carry a loss and the scale of the per-token
    gradients.

    Under DDP (`net` is the DistributedDataParallel wrapper, `world` ranks) n_label counts the
    label tokens of every rank, and each rank's loss is multiplied by `world`: DDP averages
    gradients over ranks, so the result is the gradient of Σ_all ranks CE / n_label — exactly the
    single-process gradient of the global batch. Gradients are all-reduced once, in the backward of
    the last micro-batch (no_sync before it).
    """
    loss_total = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        if method is not None:            # ∂(loss)/∂y_t = (world / n_label) ∂CE_t/∂y_t
            method.before_micro_batch(ids, labels, n_label / world)
        with nullcontext() if last or world == 1 else net.no_sync():
            with autocast or nullcontext():
                loss = net(ids, labels=labels, reduction="sum") / n_label
            objective = loss * world                              # (× 1 is exact in one process)
            reg = method.regularizer() if last and method is not None else None
            (objective if reg is None else objective + reg).backward()
        loss_total += loss.detach().float()
    # the step's one host-device sync: a NaN/inf loss must skip the step
    return loss_total.item()


def optimizer_step(optimizer, params: list, method, step: int, clip: float):
    """What follows the backward of step `step`: clip, the method's hooks around optimizer.step,
    zero_grad, and new parameters (TriAdaptLoRA growth) joining `optimizer` (a group with fresh
    warm-up) and `params` (in place). Returns (the pre-clip gradient norm as a tensor — no host
    sync — or None without clipping, the new parameters)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else None
    method.before_optimizer_step(optimizer, step)     # CTR-LoRA: curvature statistics, snapshot
    optimizer.step()
    # CTR allocator + trust region / AdaLoRA masking / TriAdaptLoRA growth
    new_params = method.after_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)     # (after the hook: importance scores read .grad)
    join_optimizer(optimizer, params, new_params, step)
    return grad_norm, new_params


def join_optimizer(optimizer, params: list, new_params: list, step: int) -> None:
    """Tensors created at step `step` (TriAdaptLoRA's growth) join as a group with fresh warm-up."""
    if new_params:
        optimizer.add_param_group({"params": new_params, "start_step": step + 1})
        params += new_params


@torch.no_grad()
def gradients_are_finite(params: list) -> bool:
    """No NaN/inf in any gradient. A finite loss can come with NaN gradients: an inf activation
    at a position without a label adds nothing to the loss, but 0 · inf = NaN in the backward."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    largest = torch._foreach_norm(grads, math.inf)   # max |g| per tensor: NaN stays, no overflow
    return bool(torch.stack([m.float() for m in largest]).isfinite().all())


def skip_step(net, optimizer, params: list, method, step: int) -> list:
    """Drop step `step` after its backward: clear the gradients and let the method forget what the
    step collected (method.skip_step: a growth due now still happens, on the state of the last
    good step; CTR-LoRA's allocation waits for the next good step). Returns the parameters
    created, already in the optimizer."""
    net.zero_grad(set_to_none=True)
    new_params = method.skip_step(step)
    join_optimizer(optimizer, params, new_params, step)
    return new_params


def nonfinite_abort_message(out: Path, step: int, count: int, cfg: TrainConfig) -> str:
    """The one line for a run that only produces NaN/inf: which steps, the likely cause, what is
    kept."""
    return (f"steps {step + 2 - count}-{step + 1}: {count} non-finite steps in a row (NaN/inf loss "
            f"or gradient): the run diverged (--lr {cfg.lr:g} too high?); {checkpoints_kept(out)}; "
            f"start again with a lower --lr and --overwrite")


def calibrate(method, examples, cfg: TrainConfig, pad_id: int, device) -> dict:
    """CG-LoRA's data-dependent initialization, on batches drawn apart from the training cursor."""
    calib = D.Batcher(examples, cfg.batch_size, pad_id, seed=cfg.seed + 1)
    batches = [next(calib) for _ in range(method.calibration_batches)]
    return method.calibrate([(b["input_ids"].to(device), b["labels"].to(device)) for b in batches])


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the metrics rows of steps after `step` (logged after the checkpoint the run resumes
    from, before it stopped: the resumed run logs those steps again), and a last row cut short
    by the stop."""
    if not path.is_file():
        return

    def before(line: str) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and row.get("step", 0) <= step
    lines = path.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n"     # the next row starts a new line
            for line in lines if line.strip() and before(line)]
    if kept != lines:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def to_device(obj, device):
    """Every tensor of a nested dict/list/tuple moved to `device` (a method's saved state: the
    optimizer's own state_dict moves its tensors itself; RNG states stay on the CPU)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def resume(out: Path, cfg: TrainConfig, net, optimizer, batcher, method, device, rank: int,
           world: int) -> tuple[int, int, list]:
    """Load the latest checkpoint of `out` into the model, optimizer, data cursor and RNGs.
    Returns (step, non-finite steps so far, the optimizer's parameters)."""
    ckpt = newest_intact_checkpoint(out, warn=rank == 0)
    # weights_only: loading a checkpoint never unpickles code
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    check_resume_config(state["config"], cfg)
    if cfg.method == "full":
        M.load_state_into(net, ckpt, torch.float32, device)
        for p in net.parameters():
            p.requires_grad_(True)
        optimizer.param_groups[0]["params"] = list(net.parameters())
    else:
        # rebuild grown structure (TriAdaptLoRA) first, so that the tensors and optimizer
        # groups exist to load into
        method_state = to_device(state.get("method", {}), device)     # (loaded to the CPU)
        for group_params, group_start in method.restore_structure(method_state):
            optimizer.add_param_group({"params": group_params, "start_step": group_start})
        IO.load_adapter_weights(net, str(ckpt))
    optimizer.load_state_dict(state["optimizer"])
    for g, s in zip(optimizer.param_groups, state["group_starts"]):
        g["start_step"] = s
    batcher.load_state_dict(state["data"])
    set_rng_state(state["rng_ranks"][rank] if world > 1 else state["rng"])
    if rank == 0:
        drop_metrics_after(out / "metrics.jsonl", state["step"])
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return state["step"], state.get("nonfinite_total", 0), params


class Progress:
    """The progress line and metrics.jsonl (rank 0 only): loss, lr, grad norm, tokens/s and the
    method's items, averaged over the steps since the last line."""

    def __init__(self, out: Path, cfg: TrainConfig, start_step: int, main_rank: bool):
        self.cfg, self.start_step, self.main_rank = cfg, start_step, main_rank
        self.file = open(out / "metrics.jsonl", "a") if main_rank else open(os.devnull, "w")
        self.t_start = time.perf_counter()
        self._reset()

    def _reset(self):
        self.loss, self.steps, self.tokens, self.t_window = 0.0, 0, 0, time.perf_counter()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def step_done(self, step: int, loss: float, tokens: int, lr: float, grad_norm, method) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens
        if not self.main_rank or (step % self.cfg.log_every and step != self.cfg.steps):
            return
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / (step - self.start_step) * (self.cfg.steps - step)
        grad_norm = float("nan") if grad_norm is None else grad_norm.item()
        row = {"step": step, "loss": self.loss / self.steps, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": self.tokens / (time.perf_counter() - self.t_window),
               "elapsed_s": round(elapsed, 1), **method.log_items()}
        print(f"step {step:5d}/{self.cfg.steps} | loss {row['loss']:.4f} | lr {lr:.2e} | "
              f"grad {grad_norm:.3f} | {row['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s",
              file=sys.stderr)
        self.write(row)
        self._reset()

    def validation(self, step: int, net, examples, batch_size: int, pad_id: int) -> None:
        if not self.main_rank:
            return
        net.eval()
        v = E.evaluate_loss(net, examples, batch_size, pad_id)
        net.train()
        print(f"step {step:5d} | validation loss {v['loss']:.4f} (ppl {v['ppl']:.2f})",
              file=sys.stderr)
        self.write({"step": step, "val_loss": v["loss"], "val_ppl": v["ppl"]})

    def close(self):
        self.file.close()


def write_products(out: Path, net, cfg: TrainConfig, step: int, wall: float) -> None:
    """The run's products (rank 0): weights, the peft export, the plots."""
    # --method full: the HF model folder goes to out/model/, apart from run_config.json
    save_weights(net, cfg, out / IO.FULL_MODEL_DIR if cfg.method == "full" else out)
    if cfg.method != "full":                           # its base named as transformers can open it
        IO.export_peft(net, cfg.adapter_config(), str(out / "peft"),
                       base_model_name_or_path=M.hf_reference(cfg.model))
    E.plot_loss_curves({cfg.method: out / "metrics.jsonl"}, out / "loss.png")
    if cfg.method != "full":
        # the ranks in use
        E.plot_rank_heatmap(A.adapter_ranks(net), out / "ranks.png", f"{cfg.method} ranks")
    if cfg.method == "ctr":
        E.plot_trust_region(out / "metrics.jsonl", out / "trust_region.png")
    print(f"done: {step} steps in {wall:.0f}s; wrote {out}/ (weights, peft/, metrics.jsonl, "
          f"loss.png, ranks.png)", file=sys.stderr)
    print(f"try it: python model.py --adapter {out} --prompt \"...\"", file=sys.stderr)


def prepare_data(cfg: TrainConfig, world: int, main_rank: bool):
    """(tokenizer, training examples, validation examples or None): read and validated before the
    (slow) model load, encoded with the checkpoint's tokenizer. --epochs sets --steps here, which
    the methods' schedules need when their adapters are built."""
    train_records, val_records, val_name = read_datasets(cfg)
    tok = load_tokenizer(M.resolve_checkpoint(cfg.model))
    train_examples = D.encode_dataset(train_records, tok, cfg.seq_len, cfg.chat, name=cfg.data)
    val_examples = (D.encode_dataset(val_records, tok, cfg.seq_len, cfg.chat, name=val_name)
                    if val_records else None)
    coverage = steps_from_epochs(cfg, len(train_examples), world)
    if main_rank:
        print(coverage + (f"; validation: {len(val_examples)} examples of {val_name}"
                          if val_examples else
                          "; no validation data (--val-data FILE or --val-fraction F)"),
              file=sys.stderr)
    if cfg.epochs and cfg.method != "full":
        cfg.adapter_config()                     # the methods' schedules, checked for these steps
    return tok, train_examples, val_examples


def prepare_training(cfg: TrainConfig, device, world: int, main_rank: bool):
    """(model, its trainable parameters, AdamW, the method's hooks, the autocast context)."""
    net, _ = build_model(cfg, device)
    if cfg.seq_len > net.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model allows "
                         f"({net.config.max_position_embeddings}); lower --seq-len")
    # checkpointing: on by default on CUDA; always with bf16 storage + fp32 compute on CPU, where
    # autograd would otherwise keep every block's fp32 weight copy (a whole fp32 model's memory)
    net.grad_checkpoint = (cfg.grad_checkpoint or device.type == "cuda"
                           or net.compute_dtype is not None)
    params = A.optimizer_parameters(net)
    if main_rank:
        print(f"{cfg.method}: {sum(p.numel() for p in params):,} trainable parameters"
              + (f"; {world} processes, global batch {cfg.batch_size * world} x {cfg.grad_accum} "
                 f"micro-batches" if world > 1 else ""), file=sys.stderr)
    # AdamW on the trainable parameters; each group remembers the step it joined (its warm-up).
    # fused: one kernel for all tensors, the same arithmetic as the loop
    optimizer = torch.optim.AdamW([{"params": params, "start_step": 0}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                  fused=device.type in ("cpu", "cuda"))
    method = (A.training_hooks(net, cfg.adapter_config()) if cfg.method != "full"
              else A.MethodHooks())
    if world > 1:                     # statistics behind rank decisions are summed over the ranks
        method.all_reduce_sum, method.world_size = all_reduce_sum, world
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    method.autocast = autocast        # (CTR-LoRA's KL check runs forwards of its own)
    return net, params, optimizer, method, autocast


def start_or_resume(out: Path, cfg: TrainConfig, net, optimizer, batcher, method, examples,
                    pad_id: int, device, rank: int, world: int):
    """(first step, non-finite steps so far, the optimizer's parameters, figures of the
    calibration): from the latest intact checkpoint with --resume; else a fresh start, after
    CG-LoRA's data-dependent initialization, replacing an earlier run's checkpoints and metrics."""
    if cfg.resume:
        return (*resume(out, cfg, net, optimizer, batcher, method, device, rank, world), {})
    calibration_info = {}
    if method.calibration_batches:                # CG-LoRA: initialized before the first step
        calibration_info = calibrate(method, examples, cfg, pad_id, device)
    if rank == 0:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return 0, 0, params, calibration_info


def global_label_count(micro: list[dict], world: int, device) -> int:
    """Label tokens of the step's micro-batches, over every rank: the loss normalizer."""
    n_label = sum(D.count_label_tokens(b) for b in micro)
    if world > 1:
        count = torch.tensor([float(n_label)], device=device)
        all_reduce_sum([count])
        n_label = int(count.item())
    return n_label


def share_loss_and_stop(loss: float, stop, device) -> float:
    """Under DDP: the global loss; any rank's signal stops every rank."""
    shared = torch.tensor([loss, float(stop.signal is not None)], device=device)
    all_reduce_sum([shared])
    if shared[1].item() > 0 and stop.signal is None:
        stop.signal = signal.SIGTERM
    return shared[0].item()


def train(cfg: TrainConfig) -> dict:
    """The loop of the module docstring. Returns {"steps", "wall_s", "nonfinite_steps", "model"}."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, rank, world = init_distributed(cfg)
    main_rank = rank == 0                          # the only writer of files and progress lines
    out = Path(cfg.out)
    if not cfg.resume and any((out / "checkpoints").glob("step-*")) and not cfg.overwrite:
        raise ValueError(f"{out} holds checkpoints of an earlier run; add --resume to continue "
                         f"it, --overwrite to start again, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    tok, train_examples, val_examples = prepare_data(cfg, world, main_rank)
    net, params, optimizer, method, autocast = prepare_training(cfg, device, world, main_rank)
    batcher = D.Batcher(train_examples, cfg.batch_size, tok.pad_id, seed=cfg.seed, rank=rank,
                        world_size=world)
    start_step, nonfinite_total, params, calibration_info = start_or_resume(
        out, cfg, net, optimizer, batcher, method, train_examples, tok.pad_id, device, rank, world)
    if main_rank:
        write_json(out / IO.RUN_CONFIG_NAME, asdict(cfg))
        if start_step >= cfg.steps:
            print(f"nothing left to train: {out} is at step {start_step} of {cfg.steps} (to "
                  f"train on, --resume with a larger --steps or --epochs; a method whose rank "
                  f"schedule is planned for --steps needs a new run); rewriting its products",
                  file=sys.stderr)
    if cfg.compile:               # after CG-LoRA's calibration (its hooks run eager)
        net.compile_blocks()
        if main_rank:
            print("--compile: the first training step compiles the blocks (tens of seconds on "
                  "CPU)", file=sys.stderr)
    ddp = wrap_ddp(net, device, world)             # the model itself in one process
    progress = Progress(out, cfg, start_step, main_rank)
    if calibration_info:
        progress.write({"step": 0, **calibration_info})
    if val_examples and start_step == 0:           # the validation curve's starting point
        progress.validation(0, net, val_examples, cfg.batch_size * 2, tok.pad_id)
    stop = StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    net.train()
    consecutive_nonfinite, step = 0, start_step
    try:
        while step < cfg.steps:
            # ---- 1. the step's micro-batches; their label tokens (all ranks) normalize the loss
            micro = [next(batcher) for _ in range(cfg.grad_accum)]
            n_label = global_label_count(micro, world, device)
            set_lrs(optimizer, step, cfg)
            rng_before = rng_state()               # a dropped step gives back its random draws

            # ---- 2. forward/backward: summed token losses / label tokens of the whole step (==
            #         one big batch), plus the method's penalty (orthogonality; none for LoRA)
            loss = accumulate_gradients(ddp, micro, n_label, device, autocast, method, world)
            if world > 1:
                loss = share_loss_and_stop(loss, stop, device)

            # ---- 3. drop a step whose loss or gradient is NaN/inf: no trace but its batch and
            #         step number (reported as step N, as the progress lines count; too many in
            #         a row abort)
            finite = math.isfinite(loss) and gradients_are_finite(params)
            if not finite:
                consecutive_nonfinite += 1
                nonfinite_total += 1
                set_rng_state(rng_before)          # (before skip_step: growth draws from it)
                new_params = skip_step(net, optimizer, params, method, step)
                what = (f"loss ({loss})" if not math.isfinite(loss)
                        else f"gradient (loss {loss:.4f})")
                print(f"step {step + 1}: non-finite {what}, step skipped", file=sys.stderr)
                if consecutive_nonfinite >= cfg.max_nonfinite:
                    raise FloatingPointError(
                        nonfinite_abort_message(out, step, consecutive_nonfinite, cfg))
            else:
                consecutive_nonfinite = 0
                # ---- 4. clip, trust region, optimizer step, allocator
                grad_norm, new_params = optimizer_step(optimizer, params, method, step, cfg.clip)
            if new_params and world > 1:           # DDP buckets are fixed at wrap time: rewrap
                ddp = None                         # (the old wrapper's gradient hooks go with it)
                gc.collect()
                ddp = wrap_ddp(net, device, world)
            step += 1

            # ---- 5. log, evaluate, checkpoint
            if finite:
                tokens = sum(D.count_input_tokens(b) for b in micro)  # real tokens, no padding
                progress.step_done(step, loss, tokens, optimizer.param_groups[0]["lr"],
                                   grad_norm, method)
            if val_examples and ((cfg.eval_every and step % cfg.eval_every == 0)
                                 or step == cfg.steps):
                progress.validation(step, net, val_examples, cfg.batch_size * 2, tok.pad_id)
            due = cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps
            if stop.signal is not None or due:
                rngs = rank_rng_states(world)
                if main_rank:
                    path = save_checkpoint(out, step, net, optimizer, batcher, cfg,
                                           {"nonfinite_total": nonfinite_total,
                                            "method": method.state_dict(), **rngs})
                    print(f"saved checkpoint {path}", file=sys.stderr)
            if stop.signal is not None:
                if main_rank:
                    print(f"stopped at step {step}; continue with: python train.py --resume "
                          f"--out {out}", file=sys.stderr)
                finish_distributed(world)
                sys.exit(128 + stop.signal)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        progress.close()
        method.close()                             # e.g. remove CTR-LoRA's statistics hooks

    net.eval()
    wall = time.perf_counter() - progress.t_start
    rngs = rank_rng_states(world)
    if main_rank:
        # the checkpoint first: it refuses NaN/inf before anything is written, products included
        save_checkpoint(out, step, net, optimizer, batcher, cfg,
                        {"nonfinite_total": nonfinite_total, "method": method.state_dict(),
                         **rngs})
        write_products(out, net, cfg, step, wall)
    finish_distributed(world)
    return {"steps": step, "wall_s": wall, "nonfinite_steps": nonfinite_total, "model": net}


def finish_distributed(world: int) -> None:
    """Wait for rank 0's files, then leave the process group (nothing to do in one process)."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.dry_run:
        print(memory.dry_run_report(cfg))
        return None
    return train(cfg)


if __name__ == "__main__":
    M.cli(main)
