"""
Files on disk: writing them so that a crash never leaves half of one behind, reading back whether a
folder's files are whole, and the error for a checkpoint folder that cannot be used.

Every file the project writes (model and adapter weights, configs, checkpoints) goes through
`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk, and the
temporary file is renamed over the target. A reader sees the old file or the new one, never a mix.

`CheckpointError` lives here rather than in model.py so that tokenizer.py and convert_gguf.py can
raise it without importing the model; model.py re-exports it as `model.CheckpointError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """An expected problem with a checkpoint folder (missing file, bad tensor...): the command
    lines (model.cli) print it as one line, without a traceback."""


def atomic_write(path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A failed write leaves no temporary file and the old `path` untouched. The file keeps the
    permissions of the one it replaces, or gets those a plain open() would give a new file
    (mkstemp's are owner-only). An error creating the temporary file names `path`.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        write(tmp)
        os.chmod(tmp, mode)                     # after: a writer may replace the file (safetensors)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj) -> None:
    """`obj` as indented JSON with a final newline, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Tensors (moved to the CPU, made contiguous) as one safetensors file, atomically.

    A NaN/inf tensor is never written (FloatingPointError naming it; the file on disk stays as it
    was): weights with NaN are of no use, and a reader could not tell them from intact ones."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise FloatingPointError(f"{path}: tensor {bad} holds NaN/inf; not written")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN/inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def unreadable_files(folder) -> list[str]:
    """'name (why)' for every file of `folder` (not its subfolders) that does not read back whole:
    a .safetensors file that is truncated or corrupt, or holds NaN/inf (write_safetensors never
    writes one, so a NaN there is damage); a .json that does not parse; a .pt that does not load.
    Every tensor is read: the cost of one load. Empty when all read back."""
    problems = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():                # one tensor in memory at a time
                        if first_nonfinite({key: f.get_tensor(key)}) is not None:
                            raise ValueError(f"tensor {key} holds NaN/inf")
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:           # each reader has its own error types for a damaged file
            problems.append(f"{path.name} ({str(e).splitlines()[0][:120]})")
    return problems


# Hugging Face's default shard size (decimal GB, as transformers counts): a 7B model in bf16
# becomes 3 files, each small enough for hosts that cap file sizes.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SINGLE_WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"


def write_model_safetensors(folder, tensors: dict[str, torch.Tensor],
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """A model's tensors in Hugging Face's layout, which transformers, vLLM and llama.cpp's
    converter read: one model.safetensors when the tensors fit in max_shard_bytes, otherwise
    model-0000i-of-0000n.safetensors files of at most max_shard_bytes each (a larger tensor gets a
    file of its own) and model.safetensors.index.json mapping every tensor to its file.

    The index is written last, so a folder with an index is complete. Files of the other layout
    left by an earlier write are removed: a loader that prefers the index must not read stale
    shards. Returns the names of the files written."""
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += size
    stale = set(folder.glob("model-*-of-*.safetensors")) | {folder / SHARD_INDEX_NAME}
    if len(shards) == 1:
        write_safetensors(folder / SINGLE_WEIGHTS_NAME, shards[0])
        for path in stale:
            path.unlink(missing_ok=True)
        return [SINGLE_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    write_json(folder / SHARD_INDEX_NAME, {"metadata": {"total_size": total},
                                           "weight_map": weight_map})
    for path in stale | {folder / SINGLE_WEIGHTS_NAME}:
        if path.name not in names and path.name != SHARD_INDEX_NAME:
            path.unlink(missing_ok=True)
    return names + [SHARD_INDEX_NAME]
