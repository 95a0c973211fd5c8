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

    A failed write leaves no temporary file and the old `path` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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
