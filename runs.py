"""
A train.py run as something to use: the model it trained, an HF model folder, text.

    python model.py --adapter runs/demo --prompt "Word: poodle\nCategory:"    # generate
    python model.py --adapter runs/demo --merge runs/demo-merged              # an HF model folder
    python model.py --prompt "What is the capital of France?"                  # a checkpoint alone

load_run gives the base checkpoint with the run's adapter (or a --method full run's model);
save_merged writes it as one plain HF model folder; main is model.py's command line, kept here
beside the run loading it needs (model.py itself never imports the adapters).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import adapter_io as IO
from fileio import DEFAULT_MAX_SHARD_BYTES, CheckpointError
from model import (DEFAULT_MODEL, Llama, cli, generate, load_model_and_tokenizer, parse_device,
                   resolve_checkpoint, save_pretrained, weights_dtype_policy)
from tokenizer import Tokenizer


def load_run(run_dir, base=None, dtype: torch.dtype | None = None, device=None,
             compute_dtype: torch.dtype | None = None) -> tuple[Llama, Tokenizer, dict]:
    """The model a train.py run produced: the base checkpoint with the run's adapter, or the
    fine-tuned model of a --method full run.

    base: the base checkpoint (default: the --model saved in the run's settings). dtype None:
    the run's --weights-dtype policy on this device. Returns (model in eval mode, its tokenizer,
    the run's saved settings, {} for an adapter folder without them)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such folder; pass the --out folder of a train.py run")
    settings = IO.read_run_config(run)
    device = parse_device(device)
    if dtype is None:
        dtype, compute_dtype = weights_dtype_policy(settings.get("weights_dtype", "auto"), device)
    full = IO.full_model_dir(run)
    if full is not None:                        # --method full: a whole HF model folder
        model, tok = load_model_and_tokenizer(full, dtype, device, compute_dtype)
        return model, tok, settings
    if not IO.is_adapter_dir(run):
        raise FileNotFoundError(f"{run}: holds neither an adapter ({IO.ADAPTER_WEIGHTS_NAME} + "
                                f"{IO.ADAPTER_CONFIG_NAME}) nor a model ({IO.FULL_MODEL_DIR}/); "
                                f"pass the --out folder of a train.py run")
    model, tok = load_model_and_tokenizer(base or run_base_model(run, settings), dtype, device,
                                          compute_dtype)
    IO.load_adapter(model, str(run))
    return model.to(device).eval(), tok, settings


def run_base_model(run: Path, settings: dict) -> str:
    """The base checkpoint of an adapter run: its --model, or, when that does not resolve from
    here (a path relative to another working folder), what its peft export names (an absolute
    path or a repo id, see hf_reference)."""
    model = settings.get("model", DEFAULT_MODEL)
    try:
        resolve_checkpoint(model)
        return model
    except CheckpointError:
        peft_config = run / "peft" / IO.PEFT_CONFIG_NAME
        if not peft_config.is_file():
            raise
        recorded = json.loads(peft_config.read_text()).get("base_model_name_or_path")
        if not recorded:
            raise
        return recorded


def save_merged(model: Llama, tok: Tokenizer, out_dir,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """A model with adapters written as one plain HF model folder (W0 + ΔW in each adapted
    linear, computed in fp32, stored in the weights' dtype; config.json; the tokenizer files):
    what transformers' from_pretrained, vLLM and llama.cpp's convert_hf_to_gguf.py read."""
    save_pretrained(IO.merged_state_dict(model), model.config, out_dir, tokenizer_dir=tok.path,
                    max_shard_bytes=max_shard_bytes)


# The command line of `python model.py` (and `python runs.py`) ------------------------------------
def check_args(args) -> None:
    """A ValueError naming the flag for a number out of its range (argparse takes 'nan' and
    'inf' as floats), checked before any model is loaded: --temperature finite and >= 0 (0 is
    greedy), --top-p in (0, 1], --max-new-tokens >= 1, --max-shard-gb finite and > 0; and
    --merge only with --adapter."""
    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                        ("--max-shard-gb", args.max_shard_gb)):
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be at least 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    if args.merge and not args.adapter:
        raise ValueError("--merge needs --adapter RUN (the run whose adapter is merged into its "
                         "base)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Load a Llama checkpoint (and a train.py run's "
                                             "adapter) and generate text, or merge the adapter "
                                             "into its base as an HF model folder.")
    ap.add_argument("--model", default=None,
                    help="checkpoint folder, name under checkpoints/, or HF repo id in the local "
                         "HF cache (default: the run's base with --adapter, else the embedded "
                         f"{DEFAULT_MODEL})")
    ap.add_argument("--adapter", default=None, metavar="RUN",
                    help="a train.py --out folder: generate with its adapter on its base model "
                         "(or with its --method full model), in its chat setting")
    ap.add_argument("--merge", default=None, metavar="OUT",
                    help="instead of generating, write the base with --adapter merged in to the "
                         "HF model folder OUT (config.json, safetensors, tokenizer files)")
    ap.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                    help="--merge: above this size the weights are split into files of at most "
                         "this many GB, with an index")
    ap.add_argument("--prompt", default="What is the capital of France?", help="the user's message")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="at most this many new tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold (temperature > 0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap the prompt in the checkpoint's chat template (default: the run's "
                         "--chat setting with --adapter, else whenever the checkpoint has one)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: bf16 on GPU, fp32 on CPU; with --adapter the "
                         "run's --weights-dtype)")
    args = ap.parse_args(argv)
    check_args(args)
    import time
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    settings = {}
    if args.adapter:
        model, tok, settings = load_run(args.adapter, args.model, dtype, args.device)
        name = f"{args.adapter} ({settings.get('method', 'adapter')})"
    else:
        model, tok = load_model_and_tokenizer(args.model or DEFAULT_MODEL, dtype, args.device)
        name = args.model or DEFAULT_MODEL
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"loaded {name}: {n:.1f}M parameters in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if args.merge:
        out = Path(args.merge)
        if out.resolve() in (Path(args.adapter).resolve(), Path(tok.path).resolve()):
            raise ValueError(f"--merge {out}: choose a new folder, not the run or the base")
        save_merged(model, tok, out, max_shard_bytes=int(args.max_shard_gb * 1e9))
        print(f"wrote {out}/ (config.json, weights, tokenizer); load it with transformers' "
              f"AutoModelForCausalLM.from_pretrained('{out}')")
        return
    chat = args.chat
    if chat is None:
        chat = settings.get("chat", False) if args.adapter else tok.chat_template is not None
    ids = tok.encode(tok.chat_prompt(args.prompt) if chat else args.prompt, bos=True)
    print(f"> {args.prompt}")
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, tok.eos_id,
                   seed=args.seed)
    print(tok.decode(out).strip())
    print(f"({len(out)} tokens, {len(out) / (time.perf_counter() - t0):.1f} tokens/s)",
          file=sys.stderr)


if __name__ == "__main__":
    cli(main)
