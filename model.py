"""
A Llama-architecture transformer (Llama 2, Llama 3 / 3.1, SmolLM2): config, layers, checkpoint
loading, generation. Parameter names are Hugging Face's, so an HF checkpoint loads with no
renaming and adapters that replace q_proj, v_proj, ... find the names peft uses.

    x = embed_tokens(idx)                  idx (B, T) -> x (B, T, C)
    x = x + attention(RMSNorm(x))          RoPE, grouped-query heads      } x L blocks
    x = x + SwiGLU_MLP(RMSNorm(x))                                        }
    logits = lm_head(RMSNorm(x))           (B, T, vocab)

Beside it: tokenizer.py, convert_gguf.py (the embedded SmolLM2's one-time conversion) and
synthetic_checkpoint.py (random weights of any preset's shape).
"""

from __future__ import annotations

import errno
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from convert_gguf import DEFAULT_MODEL_DIR, ensure_default_model
from fileio import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, atomic_write, write_json,
                    write_model_safetensors)
from hf_cache import HF_REPO_ID, hf_cache_dir, hf_cache_snapshot, hf_download_command
from tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

REPO_DIR = Path(__file__).resolve().parent
CHECKPOINTS_DIR = REPO_DIR / "checkpoints"      # checkpoints/<name>; DEFAULT_MODEL_DIR is one
DEFAULT_MODEL = "smollm2-135m"                  # the embedded one (convert_gguf.py)


# 1. Config and presets ----------------------------------------------------------------------------
@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32      # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int | None = None        # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama 3.1: {"rope_type": "llama3", "factor": 8, ...}
    tie_word_embeddings: bool = False  # SmolLM2 shares embed_tokens.weight with lm_head
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From an HF config.json dict; other keys (architectures, torch_dtype...) are ignored."""
        kind = d.get("model_type", "llama")
        if kind not in ("llama", "mistral"):
            raise ValueError(f"model_type '{kind}' is not a Llama-architecture model")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act '{d['hidden_act']}' is not supported (Llama uses silu)")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 writes rope settings as "rope_parameters" (theta inside it)
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = rp
        rs = kw.get("rope_scaling")
        if rs and rs.get("rope_type", rs.get("type")) in (None, "default"):
            kw["rope_scaling"] = None
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found; a checkpoint folder needs the "
                                  f"HF config.json next to its safetensors")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a usable Llama config ({e})") from None

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' LlamaForCausalLM reads."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
        return d


# Shapes of the models this project targets. Weights are the user's to download into
# checkpoints/<name>, except smollm2-135m, which is embedded (convert_gguf.py).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_id=128001),
}
ALIASES = {"llama-7b": "llama2-7b", "llama-13b": "llama2-13b", "llama-3-8b": "llama3-8b",
           "smollm2": "smollm2-135m"}
HF_REPOS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-13b": "meta-llama/Llama-2-13b-hf",
            "llama3-8b": "meta-llama/Meta-Llama-3-8B"}


def preset_config(name: str) -> LlamaConfig:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return LlamaConfig(**PRESETS[name])


# 2. The network -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, scaled as cfg.rope_scaling asks.

    Llama 3.1 ("llama3"): wavelengths above original_ctx / low_freq_factor are divided by `factor`,
    those below original_ctx / high_freq_factor are kept, and the band between is interpolated
    smoothly. "linear": every frequency is divided by `factor`."""
    d = cfg.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type == "linear":
        return inv_freq / rs["factor"]
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type '{rope_type}' is not supported "
                         f"(supported: llama3, linear)")
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)   # long: slowed down
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """cos, sin of shape (T, head_dim) for HF's half-rotation layout: angles repeated [f, f]."""
    angles = positions.float()[:, None] * inv_freq[None, :]        # (T, d/2), in fp32
    emb = torch.cat((angles, angles), dim=-1)                       # (T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle. x: (B, H, T, d). HF's rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values per layer, pre-allocated (B, n_kv, max_len, d); `pos`: tokens cached."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device, dtype):
        zeros = lambda: torch.zeros(batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                                    device=device, dtype=dtype)
        self.k = [zeros() for _ in range(cfg.num_hidden_layers)]
        self.v = [zeros() for _ in range(cfg.num_hidden_layers)]
        self.pos = 0

    def update(self, layer: int, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


def math_attention(q, k, v, causal_offset: int | None):
    """softmax(q k^T / sqrt(d) + mask) v written out in fp32: unlike the fused SDPA kernels it
    supports double backward (Hessian-vector products). q: (B, H, Tq, d); k, v: (B, H, Tk, d).
    Query i sits at absolute position causal_offset + i and sees the keys at positions <= it."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])   # (B, H, Tq, Tk)
    if causal_offset is not None:
        Tq, Tk = q.shape[2], k.shape[2]
        qpos = torch.arange(Tq, device=q.device)[:, None] + causal_offset
        kpos = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        C, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, C, bias=b)
        self.attn_impl = "sdpa"        # "sdpa" (fused kernels) or "math" (double-backward safe)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)    # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)       # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        offset = 0
        if cache is not None:
            offset = cache.pos
            k, v = cache.update(layer, k, v)                                    # (B, Hkv, pos+T, d)
        # grouped-query attention (Llama 3, SmolLM2): each K/V head serves n_heads / n_kv query
        # heads; SDPA's enable_gqa shares them without copying k, v, the math path repeats them
        gqa = self.n_heads != self.n_kv
        if self.attn_impl == "math":
            if gqa:
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = math_attention(q, k, v, causal_offset=offset)
        elif offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:                                        # one new token sees the whole cache
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:                                               # a chunk after a cached prefix
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)             # (B, T, H*d)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=b)
        self.up_proj = nn.Linear(C, I, bias=b)
        self.down_proj = nn.Linear(I, C, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Holds the weights under the HF prefix `model.` (embed_tokens, layers, norm)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def call_in_dtype(module: nn.Module, dtype: torch.dtype | None, *args):
    """module(*args) computed in `dtype` (fp32) while big frozen weights are stored in bf16.

    Parameters of another floating dtype (the frozen base weights) are replaced, for this call
    only, by cast copies (torch.func.functional_call); those already in `dtype` (fp32 adapter
    factors) are used as they are, so gradients and forward hooks work as usual. bf16 -> fp32 is
    exact: the result is that of an fp32 model of the bf16-rounded weights. A copy lives as long
    as the autograd graph that uses it: one block's at a time with grad_checkpoint (~0.8 GB at 7B;
    backward rebuilds them block by block), every block's without (the memory of an fp32 model)."""
    if dtype is None:
        return module(*args)
    copies = {name: p.to(dtype) for name, p in module.named_parameters()
              if p.is_floating_point() and p.dtype != dtype}    # differentiable: a trainable
    if not copies:                                               # bf16 parameter gets its grad
        return module(*args)
    return torch.func.functional_call(module, copies, args)


class Llama(nn.Module):
    """The causal LM. A caller may set grad_checkpoint, compute_dtype and set_attention(...)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpoint = False     # recompute each block in backward (less activation memory)
        self.compute_dtype: torch.dtype | None = None   # None: the weights' dtype; call_in_dtype
        self.compiled_block = None       # compile_blocks(): the block call training steps use

    def set_attention(self, impl: str):
        """'sdpa' (default, fast) or 'math' (explicit softmax: double backward, for HVPs)."""
        if impl not in ("sdpa", "math"):
            raise ValueError(f"unknown attention implementation '{impl}' (use sdpa or math)")
        for block in self.model.layers:
            block.self_attn.attn_impl = impl

    def compile_blocks(self, **options):
        """torch.compile (with `options`) the block call that training forwards use.

        The blocks' parameters are graph inputs, so one graph serves every block and compile time
        does not grow with depth; evaluation, generation and no-grad passes stay eager. Inductor
        gains by fusing the elementwise work (RMSNorm, RoPE, SwiGLU, residual adds). Limits:
        adapter growth (TriAdaptLoRA) recompiles, and past torch's limit of 8 the rest runs eager
        (train.py refuses that pairing); hooks inside blocks and double backward are not meant to
        run compiled (curvature switches to eager); dropout masks differ from eager's (same
        distribution); on CPU inductor needs a C++ compiler."""
        self.compiled_block = torch.compile(call_in_dtype, **options)
        return self

    @property
    def attention_impl(self) -> str:
        return self.model.layers[0].self_attn.attn_impl if len(self.model.layers) else "sdpa"

    def hidden_states(self, idx, cache: KVCache | None = None):
        """Final normed hidden states (B, T, C) for token ids idx (B, T)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model allows "
                             f"({self.config.max_position_embeddings}); use a shorter --seq-len")
        dtype = self.compute_dtype
        x = self.model.embed_tokens(idx)                    # (B, T, C), in the storage dtype
        if dtype is not None:
            x = x.to(dtype)              # look up, then cast: no fp32 copy of the whole table
        positions = torch.arange(start, start + T, device=idx.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)          # (T, d) each
        train_step = self.training and torch.is_grad_enabled() and cache is None
        compiled = train_step and self.compiled_block is not None
        run = self.compiled_block if compiled else call_in_dtype
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpoint and train_step:        # recomputed, copies too, in backward
                x = checkpoint(run, block, dtype, x, cos, sin, use_reentrant=False)
            elif cache is None:
                x = run(block, dtype, x, cos, sin)
            else:
                x = call_in_dtype(block, dtype, x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        return call_in_dtype(self.model.norm, dtype, x)

    def label_logits(self, idx, keep):
        """(N, vocab) logits at the N positions where keep (B, T) is True, the LM head applied only
        there, as forward does: for the calibration and curvature passes that need logits."""
        return call_in_dtype(self.lm_head, self.compute_dtype, self.hidden_states(idx)[keep])

    def forward(self, idx, labels=None, cache: KVCache | None = None, reduction: str = "mean"):
        """idx (B, T) -> logits (B, T, vocab); or, with labels (B, T), the cross-entropy loss.

        labels[b, t] is the token to predict at position t (-100: none). The LM head, much of a
        small model's compute, is applied only where there is a label."""
        h = self.hidden_states(idx, cache)
        if labels is None:
            return call_in_dtype(self.lm_head, self.compute_dtype, h)
        keep = labels != -100                                               # (B, T) bool
        logits = call_in_dtype(self.lm_head, self.compute_dtype, h[keep])   # (N, vocab)
        return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)


# 3. Loading and saving checkpoints (HF layout: config.json + safetensors, one file or sharded) ----
def default_dtype(device) -> torch.dtype:
    """The one dtype policy: bf16 on a GPU that supports it, fp32 on CPU (bf16 matmuls are slow)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name, need_present: bool = True) -> torch.device:
    """A --device value (None or '' = default_device()) as a torch.device. A string torch does not
    know, or (need_present) a CUDA device this machine lacks, is a ValueError naming --device."""
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(name or default_device())
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or "
                             f"cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if need_present and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch "
                             f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             f"GPU(s), numbered from 0")
    return device


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A folder path, or a name looked up as checkpoints/<name> (aliases such as llama-7b ->
    llama2-7b work). smollm2-135m is converted from the embedded GGUF on first use."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    name = str(name_or_path)
    canonical = ALIASES.get(name, name)
    candidates = [CHECKPOINTS_DIR / name, CHECKPOINTS_DIR / canonical]
    candidates += [CHECKPOINTS_DIR / a for a, c in ALIASES.items() if c == canonical]
    for c in candidates:
        if c.is_dir():
            return c
    if canonical == "smollm2-135m":
        return ensure_default_model(DEFAULT_MODEL_DIR)
    repo_id = HF_REPOS.get(canonical) or (name if HF_REPO_ID.fullmatch(name) else None)
    if repo_id is not None:
        snapshot = hf_cache_snapshot(repo_id)
        if snapshot is not None:
            return snapshot
        where = (f"'{name}' is not in {CHECKPOINTS_DIR}" if canonical in HF_REPOS
                 else f"'{name}' is not a folder")
        raise CheckpointError(f"{where}, and the Hugging Face repository {repo_id} is not in the "
                              f"local HF cache ({hf_cache_dir()}); download it with: "
                              f"{hf_download_command(repo_id)} (gated models such as Llama: "
                              f"accept the licence on huggingface.co and run `hf auth login` "
                              f"first)")
    raise CheckpointError(f"'{name}' is neither a folder nor a checkpoint in {CHECKPOINTS_DIR}; "
                          f"pass a folder with config.json and model.safetensors, an HF repo id "
                          f"(owner/name), or one of: {', '.join(sorted(HF_REPOS))}")


def hf_reference(name_or_path) -> str:
    """What transformers' from_pretrained opens as this checkpoint, for files that name their
    base model (peft's base_model_name_or_path): the repo id when the checkpoint is a snapshot in
    the HF cache (.../models--owner--name/snapshots/<commit>), else the folder's absolute path."""
    path = resolve_checkpoint(name_or_path).resolve()
    repo_folder = path.parent.parent.name
    if path.parent.name == "snapshots" and repo_folder.startswith("models--"):
        owner, _, name = repo_folder[len("models--"):].partition("--")
        return f"{owner}/{name}"
    return str(path)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from model.safetensors or its sharded index."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); "
                                  f"re-download it") from None
        return {k: path / f for k, f in weight_map.items()}
    if single.is_file():
        with _open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; only "
                          f"safetensors checkpoints are loaded (convert .bin files with "
                          f"transformers first)")


def _open_safetensors(file: Path):
    """safe_open(file); a truncated or corrupt file is a CheckpointError that says so."""
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:      # safetensors has its own error types for truncated/corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]}); "
                              f"the file is truncated or corrupt, download it again") from None


def load_state_into(model: nn.Module, path: Path, dtype: torch.dtype, device) -> None:
    """Stream every tensor of a (sharded) HF checkpoint into `model` (built on the meta device).

    Each tensor goes from the memory-mapped file straight to (dtype, device): peak memory is about
    one copy of the weights. Strict: missing, unexpected and mis-shaped tensors are errors."""
    files = _weight_files(path)
    params = dict(model.named_parameters())         # a tied lm_head appears once, as embed_tokens
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    ignorable = lambda k: k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")
    missing = sorted(set(params) - set(files))
    unexpected = sorted(k for k in files if k not in params and not ignorable(k))
    problems = [f"{what} {len(ks)} tensors (e.g. {', '.join(ks[:3])})"
                for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the config: {'; '.join(problems)}"
                              f"; check that config.json belongs to these weights")
    by_file: dict[Path, list[str]] = {}
    for k in params:
        by_file.setdefault(files[k], []).append(k)
    modules = dict(model.named_modules())
    for file, keys in by_file.items():
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in the index is missing; "
                                  f"download it again")
        with _open_safetensors(file) as f:
            for k in keys:
                try:
                    t = f.get_tensor(k)
                except Exception as e:
                    why = str(e).splitlines()[0]
                    raise CheckpointError(f"{file}: tensor {k} cannot be read ({why}); the file is "
                                          f"corrupt, download it again") from None
                if t.shape != params[k].shape:
                    raise CheckpointError(f"{file}: tensor {k} has shape {tuple(t.shape)} but the "
                                          f"config expects {tuple(params[k].shape)}; check that "
                                          f"config.json belongs to these weights")
                mod_name, _, attr = k.rpartition(".")
                weight = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
                setattr(modules[mod_name], attr, weight)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def weights_dtype_policy(weights_dtype: str, device) -> tuple[torch.dtype, torch.dtype | None]:
    """A --weights-dtype choice -> (storage dtype, compute dtype) for load_pretrained.

    auto: default_dtype(device), computed in it. float32: fp32 weights and arithmetic. bfloat16:
    bf16 weights (half the memory: 7B in 13.5 GB), computed in fp32 block by block on CPU
    (call_in_dtype; CPUs without bf16 units are slow at bf16 matmuls), in bf16 on GPU."""
    device = torch.device(device)
    if weights_dtype == "auto":
        return default_dtype(device), None
    if weights_dtype == "float32":
        return torch.float32, None
    if weights_dtype == "bfloat16":
        return torch.bfloat16, (torch.float32 if device.type == "cpu" else None)
    raise ValueError(f"unknown weights dtype '{weights_dtype}' (use auto, float32 or bfloat16)")


def load_pretrained(path_or_name, dtype: torch.dtype | None = None, device=None,
                    compute_dtype: torch.dtype | None = None) -> Llama:
    """Build a Llama on the meta device and stream the checkpoint's weights into it (frozen, eval).

    dtype: of the stored weights (None: default_dtype(device)). compute_dtype: None computes in
    that dtype; torch.float32 with bf16 weights computes in fp32 (Llama.compute_dtype)."""
    device = parse_device(device)
    dtype = dtype or default_dtype(device)
    path = resolve_checkpoint(path_or_name)
    cfg = LlamaConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = Llama(cfg)
    load_state_into(model, path, dtype, device)
    model.inv_freq = rope_inv_freq(cfg, device=device)   # buffers built on meta: recomputed
    model.compute_dtype = compute_dtype
    return model.eval()


def load_model_and_tokenizer(path_or_name, dtype=None, device=None,
                             compute_dtype=None) -> tuple[Llama, Tokenizer]:
    """load_pretrained, and the checkpoint's tokenizer (checked to fit the embedding)."""
    model = load_pretrained(path_or_name, dtype, device, compute_dtype)
    return model, load_tokenizer(resolve_checkpoint(path_or_name), model.config.vocab_size)


def save_pretrained(state_dict: dict, cfg: LlamaConfig, out_dir, tokenizer_dir=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """An HF-format folder: config.json, model.safetensors (or shards + index above
    max_shard_bytes) [, tokenizer files], each atomic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = dict(state_dict)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)                      # tied: stored once, as HF does
    write_model_safetensors(out, sd, max_shard_bytes)
    write_json(out / "config.json", hf_config_with_dtype(cfg, sd))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                atomic_write(out / name, lambda p, s=src: Path(p).write_bytes(s.read_bytes()))


def hf_config_with_dtype(cfg: LlamaConfig, state_dict: dict) -> dict:
    """config.json with the weights' dtype as `torch_dtype`: the dtype transformers and vLLM load
    the model in when asked for "auto"."""
    d = cfg.to_hf_dict()
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        d["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    return d


# 4. Generation (KV cache; greedy or temperature + top-p) ------------------------------------------
def sample_next(logits, temperature: float, top_p: float, generator=None):
    """logits (B, vocab) -> next ids (B,). temperature 0: greedy; top_p < 1 keeps the smallest set
    of tokens whose probabilities sum to at least top_p (the nucleus)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p          # the nucleus is already full
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             use_cache: bool = True, seed: int | None = None, stream=None) -> list[int]:
    """Continue one prompt: the new token ids, up to eos_id. stream(id) is called per token."""
    device = model.inv_freq.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    dtype = model.compute_dtype or next(model.parameters()).dtype     # keys/values: activations
    cache = KVCache(model.config, 1, max_len, device, dtype) if use_cache else None
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    x = ids
    for _ in range(max_len - len(prompt_ids)):
        logits = model(x, cache=cache)[:, -1]           # (1, vocab): only the last position counts
        nxt = sample_next(logits, temperature, top_p, gen)
        new.append(int(nxt))
        if stream is not None:
            stream(new[-1])
        if eos_id is not None and new[-1] == eos_id:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        x = nxt[:, None] if use_cache else ids          # with a cache only the new token is fed
    return new


def cli(main_fn, argv=None):
    """Run a CLI entry point: expected errors become one line on stderr and exit code 1.
    FloatingPointError is a run that diverged (NaN/inf): train.py says which step and why.
    An OSError on one of the user's paths (a file where a folder is needed, no permission, a
    full disk) is one line naming the path (os_error_line); any other OSError is a bug and keeps
    its traceback."""
    try:
        main_fn(argv)
    except (CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# what to do about an OSError on a path, by its type (the first that matches)
OS_ERROR_ADVICE = [
    (FileExistsError, "already exists; move it away or choose another path"),
    (IsADirectoryError, "is a folder, not a file; give a file path"),
    (NotADirectoryError, "a part of this path is a file, not a folder; choose another path"),
    (PermissionError, "permission denied; choose a path you may use, or change its permissions"),
    (FileNotFoundError, "no such file or folder; check the path"),
]
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def os_error_line(e: OSError) -> str | None:
    """The `error:` line (without the prefix) for an OSError: the project's own message when it
    raised one (FileNotFoundError("...")), the path and what to do for the operating system's
    errors on a path, a full disk; None for any other (unexpected) OSError."""
    if e.errno is None:
        return str(e)                                     # raised by this project with a message
    if e.errno in DISK_FULL_ERRNOS:
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on the device{where}; free some space and run again"
    if e.filename is None:
        return None
    path = e.filename2 or e.filename       # a rename (atomic_write's): the target is the user's
    advice = next((text for kind, text in OS_ERROR_ADVICE if isinstance(e, kind)),
                  f"{e.strerror}; check the path")
    if isinstance(e, FileExistsError) and Path(e.filename).is_file():   # mkdir(exist_ok=True)
        advice = "is a file where a folder is needed; move it away or choose another path"
    return f"{path}: {advice}"


if __name__ == "__main__":     # the command line (generate with a checkpoint or a run, or merge)
    import runs                # lives with the run loading it needs: runs.py
    cli(runs.main)
