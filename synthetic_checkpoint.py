"""
Synthetic checkpoints: an HF checkpoint folder of any preset's shape with random weights, so that
real-size loading, memory and speed can be tried without downloading anything.

scripts/make_synthetic_checkpoint.py is its command line; benchmarks/bench_big_cpu.py writes a 7B
one to measure a training step on a CPU; tests/test_scale.py checks the folder against
transformers and the safetensors library. notes/scale.md (section 2) explains the choices.

    out/config.json                              LlamaConfig.to_hf_dict() + torch_dtype
    out/model-00001-of-0000n.safetensors ...     shards of <= shard_bytes (one: model.safetensors)
    out/model.safetensors.index.json             {"metadata": {"total_size"}, "weight_map"}
    out/tokenizer.json, tokenizer_config.json    a copy of tokenizer_from, or a byte-level BPE
    out/SYNTHETIC.txt                            what this is: random weights, knows no language
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch

from model import CheckpointError, Llama, LlamaConfig, preset_config, resolve_checkpoint
from tokenizer import TOKENIZER_FILES

SYNTHETIC_INIT_STD = 0.02   # every matrix ~ N(0, 0.02²) (HF's initializer_range); RMSNorm weights 1
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def checkpoint_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of everything a checkpoint of `cfg` stores, in model order.

    A tied lm_head is not stored, as HF does. Read off a model built on the meta device, so it
    can never disagree with the loader.
    """
    with torch.device("meta"):
        model = Llama(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in order) into shards of at most shard_bytes each, greedily, as HF's
    sharding does; a tensor bigger than shard_bytes gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     seed: int) -> torch.Tensor:
    """The random tensor `name`: a function of (seed, name) only, so the checkpoint does not depend
    on the sharding or on the order of writing.

    Matrices ~ N(0, 0.02²), norm weights 1, biases 0: with these scales a forward through
    Llama 2 7B's 32 random layers gives finite logits (notes/scale.md).
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, SYNTHETIC_INIT_STD, generator=gen)


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]],
                                dtype: torch.dtype, make) -> int:
    """Write a .safetensors file tensor by tensor; returns the bytes of tensor data.

    make(name) is called for one tensor at a time, which is written and dropped, so memory holds
    one tensor, not the file. The format (github.com/huggingface/safetensors): an 8-byte
    little-endian header length N; N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
    end)}, "__metadata__": {...}}, padded with spaces to a multiple of 8; then the tensors' raw
    little-endian bytes, contiguous, in offset order.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape in shapes.items():
            t = make(name)
            assert t.dtype == dtype and tuple(t.shape) == shape, name
            f.write(t.contiguous().view(torch.uint8).numpy().data)   # numpy has no bf16: bytes
    return offset


def byte_level_tokenizer_files(cfg: LlamaConfig) -> dict[str, str]:
    """A small, valid byte-level BPE tokenizer (HF `tokenizers`) for synthetic checkpoints.

    ids 0, 1, 2 = <unk>, <s>, </s> (Llama 2's layout); then one token per byte value that can occur
    in UTF-8 text (all but 0xC0, 0xC1, 0xF5-0xFF, which no UTF-8 string contains), spelled with
    GPT-2's printable byte alphabet; no merges, so every byte is one token and any str round-trips
    exactly. The 246 tokens fit even the tiny preset. Llama 2-style: BOS added, EOS = </s>; no chat
    template (a base model).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]   # GPT-2 keeps these as is
    byte_char, shifted = {}, 0
    for b in range(256):                                                # the others: chr(256 + k)
        byte_char[b] = chr(b) if b in printable else chr(256 + shifted)
        shifted += b not in printable
    specials = ["<unk>", "<s>", "</s>"]
    utf8_bytes = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
    vocab = {t: i for i, t in enumerate(specials + [byte_char[b] for b in utf8_bytes])}
    if len(vocab) > cfg.vocab_size:
        raise ValueError(f"vocab_size {cfg.vocab_size} is too small for the {len(vocab)}-token "
                         f"byte-level tokenizer")
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tk.to_str(), "tokenizer_config.json": json.dumps(tcfg, indent=2)}


def write_synthetic_checkpoint(out, preset_or_config: str | LlamaConfig,
                               num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                               shard_bytes: int = 2_000_000_000, seed: int = 0,
                               tokenizer_from=None, overwrite: bool = False) -> Path:
    """Write an HF-format checkpoint folder of a preset's (or a config's) shape, random weights.

    The folder's files are listed in this module's docstring; num_layers overrides the preset's
    num_hidden_layers. Tensors are generated and written one at a time (peak memory ~ the largest
    tensor: Llama 2 7B's bf16 embedding is 262 MB) into a temporary folder beside `out`, renamed
    into place at the end, so `out` is complete or absent if the writer is interrupted (files are
    not fsync'd: after a power cut, write it again). The weights depend only on (seed, tensor
    name): see synthetic_tensor.
    """
    from tokenizers import Tokenizer as HFTokenizer
    cfg = (preset_config(preset_or_config) if isinstance(preset_or_config, str)
           else preset_or_config)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported "
                         f"(use {', '.join(str(d) for d in SAFETENSORS_DTYPES)})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; delete it or pass overwrite=True "
                              f"(--overwrite)")
    if tokenizer_from is not None:               # a real tokenizer, if its ids fit the embedding
        src = resolve_checkpoint(tokenizer_from)
        hf_tok = HFTokenizer.from_file(str(src / "tokenizer.json"))
        n_tokens = hf_tok.get_vocab_size(with_added_tokens=True)
        if n_tokens > cfg.vocab_size:
            raise ValueError(f"the tokenizer in {src} has {n_tokens} tokens but the config's "
                             f"vocab_size is {cfg.vocab_size}; leave tokenizer_from out to get a "
                             f"byte-level tokenizer that fits")
        tok_files = {n: (src / n).read_text() for n in TOKENIZER_FILES if (src / n).is_file()}
    else:
        tok_files = byte_level_tokenizer_files(cfg)
    shapes = checkpoint_shapes(cfg)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {k: math.prod(s) * itemsize for k, s in shapes.items()}
    total_size = sum(sizes.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total_size * 1.02 + 2**20:
        raise CheckpointError(f"{out.parent}: {free / 1e9:.1f} GB free, the checkpoint needs "
                              f"{total_size / 1e9:.1f} GB")
    shards = plan_shards(sizes, shard_bytes)
    n = len(shards)
    files = (["model.safetensors"] if n == 1
             else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for file, names in zip(files, shards):
            write_safetensors_streaming(tmp / file, {k: shapes[k] for k in names}, dtype,
                                        lambda k: synthetic_tensor(k, shapes[k], dtype, seed))
        if n > 1:
            index = {"metadata": {"total_size": total_size},
                     "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = dict(cfg.to_hf_dict(), torch_dtype=str(dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name, text in tok_files.items():
            (tmp / name).write_text(text)
        (tmp / "SYNTHETIC.txt").write_text(
            f"Synthetic checkpoint written by synthetic_checkpoint.write_synthetic_checkpoint: "
            f"random weights (seed {seed}, N(0, {SYNTHETIC_INIT_STD}^2) matrices, norms 1), "
            f"{cfg.num_hidden_layers} layers, {dtype}. "
            f"For loading, memory and speed tests only; it knows no language.\n")
        if out.exists():
            shutil.rmtree(out)                           # overwrite=True
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
