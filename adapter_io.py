"""
Adapter files: this project's format (save_adapter / load_adapter), HF peft's (export_peft), and
the merged weights (merged_state_dict); and the names of the files in a train.py run folder.

This project's format is two files in a folder:
    adapter.safetensors       the adapter tensors only, keyed by full module name
    adapter.json              {"format_version", "method", "config": AdapterConfig, "ranks",
                               "active_ranks", "base_model"}: what load_adapter needs to rebuild
                               the layers; "base_model" (the base's name and shapes) lets it say
                               so when an adapter meets another base
peft's format (export_peft) is `adapter_model.safetensors` + its own `adapter_config.json`: every
method exports as a plain LoRA through its layers' lora_factors() (A, B, c), with `rank_pattern`
where modules differ, so peft and the servers that read peft adapters can load it.

A run folder (train.py --out) never uses a file name that Hugging Face tools read with another
meaning, so that pointing transformers or peft at the wrong folder fails instead of misreading:

    RUN/adapter.safetensors, RUN/adapter.json    this project's adapter
    RUN/run_config.json                          the run's settings (train.TrainConfig)
    RUN/peft/                                    the peft export (adapter_config.json is peft's)
    RUN/model/                                   --method full: the fine-tuned HF model folder
Runs written before these names (adapter_config.json, config.json, the full model in RUN itself)
still load: the readers below fall back to the old names.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch
import torch.nn as nn
from safetensors import safe_open

import adapters as A
from adapter_config import AdapterConfig, has_type
from fileio import CheckpointError, first_nonfinite, write_json, write_safetensors

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"        # this project's format
ADAPTER_CONFIG_NAME = "adapter.json"
LEGACY_ADAPTER_CONFIG_NAME = "adapter_config.json"  # this project's, in runs before adapter.json
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"     # HF peft's
PEFT_CONFIG_NAME = "adapter_config.json"
RUN_CONFIG_NAME = "run_config.json"                 # a run's settings (train.TrainConfig)
LEGACY_RUN_CONFIG_NAME = "config.json"
FULL_MODEL_DIR = "model"                            # --method full: RUN/model/ is an HF folder
FORMAT_VERSION = 1


def save_adapter(model: nn.Module, cfg: AdapterConfig, out_dir: str,
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter.safetensors and adapter.json, each atomically; the config last, so a
    folder with a config is complete. "ranks" are the shape ranks load_adapter needs to rebuild the
    tensors; "active_ranks" the ranks in use (AdaLoRA's kept triplets), for reports; "base_model"
    the base's name (if given) and shapes."""
    layers = A.adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save; call apply_method first")
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS_NAME), A.adapter_state_dict(model))
    write_json(os.path.join(out_dir, ADAPTER_CONFIG_NAME), {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "ranks": {name: layer.rank for name, layer in layers.items()},
        "active_ranks": A.adapter_ranks(model),
        "base_model": {"name_or_path": base_model_name_or_path, **base_model_shapes(model)},
    })


# what tells two bases apart in a model's config (model.py's LlamaConfig and transformers' alike)
BASE_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "vocab_size")


def base_model_shapes(model: nn.Module) -> dict[str, int]:
    config = getattr(model, "config", None)
    return {k: getattr(config, k) for k in BASE_SHAPE_KEYS
            if isinstance(getattr(config, k, None), int)}


def check_same_base(model: nn.Module, adapter_dir: str, saved: dict | None) -> None:
    """A one-line ValueError if the adapter was saved on a base of other shapes than `model`,
    naming both (an adapter file from before "base_model" is checked by its tensors only)."""
    now = base_model_shapes(model)
    differ = [k for k in BASE_SHAPE_KEYS if k in now and k in (saved or {}) and saved[k] != now[k]]
    if differ:
        name = saved.get("name_or_path") or "another model"
        raise ValueError(f"{adapter_dir}: this adapter was trained on {name} ("
                         + ", ".join(f"{k} {saved[k]}" for k in differ) + "), but the base model "
                         "given has " + ", ".join(f"{k} {now[k]}" for k in differ)
                         + f": pass the base it was trained on (--model {name})")


def read_adapter_config(path: str) -> tuple[AdapterConfig, dict[str, int]]:
    """Read and validate this project's adapter.json -> (config, per-module shape ranks)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} at {path}; is this an adapter folder "
                                f"written by save_adapter?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    known = ["format_version", "method", "config", "ranks"]
    optional = ["active_ranks", "base_model"]
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    unknown = [k for k in meta if k not in known + optional]
    missing = [k for k in known if k not in meta]
    if unknown or missing:
        raise ValueError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; "
                         f"expected {known}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    try:
        cfg = AdapterConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if meta["method"] != cfg.method:
        raise ValueError(f"{path}: 'method' is {meta['method']!r} but config.method is "
                         f"{cfg.method!r}")
    for key in ("ranks", "active_ranks"):
        if key in meta and not has_type(meta[key], dict[str, int]):
            raise ValueError(f"{path}: {key!r} must map module names to int ranks")
    if "base_model" in meta and not has_type(meta["base_model"], dict[str, int | str | None]):
        raise ValueError(f"{path}: 'base_model' must map config keys to ints (and name_or_path)")
    return cfg, meta["ranks"]


def load_adapter(model: nn.Module, adapter_dir: str) -> AdapterConfig:
    """Build the adapter described by `adapter_dir` into a base `model` and load its tensors.

    Strict: any missing, unexpected or mis-shaped tensor is an error, as is an unreadable file or
    a NaN/inf tensor (CheckpointError), and the plain linears are put back. Returns the adapter's
    config. Only the adapter parameters are left trainable.
    """
    config_path = adapter_config_path(adapter_dir)
    cfg, ranks = read_adapter_config(config_path)
    if not os.path.exists(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_dir}")
    with open(config_path) as f:
        check_same_base(model, adapter_dir, json.load(f).get("base_model"))
    A.apply_method(model, cfg.method, cfg, ranks=ranks)
    try:
        load_adapter_weights(model, adapter_dir)
    except (ValueError, CheckpointError):
        A.remove_adapters(model)
        raise
    return cfg


def load_adapter_weights(model: nn.Module, adapter_dir: str) -> None:
    """Copy adapter_dir/adapter.safetensors into a model that already has matching adapters.

    TriAdaptLoRA layers are first grown to the ranks in adapter.json (growth leaves the
    function unchanged; on resume train.py has already replayed the growth, so the new tensors
    are in the optimizer, and this is a no-op). Strict, as load_adapter; nothing is copied then
    (every tensor is read and checked before the first is copied).
    """
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    layers = A.adapter_layers(model)
    config_path = adapter_config_path(adapter_dir)
    if (any(isinstance(m, A.TriAdaptLinear) for m in layers.values())
            and os.path.exists(config_path)):
        _, saved_ranks = read_adapter_config(config_path)
        for name, layer in layers.items():
            if isinstance(layer, A.TriAdaptLinear) and saved_ranks.get(name, 0) > layer.rank:
                layer.grow_to(saved_ranks[name])
    expected = A.adapter_state_dict(model)
    if not expected:
        raise ValueError("model has no adapters to load weights into; use load_adapter on a base "
                         "model instead")
    try:
        f = safe_open(weights_path, framework="pt")
    except Exception as e:              # safetensors' own error types for a truncated/corrupt file
        raise CheckpointError(f"{weights_path}: unreadable ({str(e).splitlines()[0]}); the file is "
                              f"truncated or corrupt") from None
    with f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        problems = state_dict_problems({k: tuple(v.shape) for k, v in expected.items()}, found)
        if problems:
            raise ValueError(f"{weights_path} does not fit the model's adapters: {problems}")
        tensors = {key: f.get_tensor(key) for key in expected}
    bad = first_nonfinite(tensors)
    if bad is not None:                 # write_safetensors never writes one: the file is damaged
        raise CheckpointError(f"{weights_path}: tensor {bad} holds NaN/inf; the file is corrupt")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])          # casts to the adapter dtype, moves to its device


def state_dict_problems(expected: dict[str, tuple], found: dict[str, tuple], show: int = 5) -> str:
    """One line listing missing / unexpected / mis-shaped keys ("" if none)."""
    def listing(items):
        more = f" (+{len(items) - show} more)" if len(items) > show else ""
        return ", ".join(items[:show]) + more
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k} {list(found[k])} != expected {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {listing(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {listing(misshaped)}")
    return "; ".join(parts)


def _json_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def export_peft(model: nn.Module, cfg: AdapterConfig, out_dir: str,
                base_model_name_or_path: str | None = None) -> None:
    """Write the adapter in HF peft's LoRA format: adapter_model.safetensors + adapter_config.json.

    Keys are `base_model.model.<module>.lora_A.weight` (r, d_in) and `.lora_B.weight` (d_out, r).
    peft scales by lora_alpha / r per module, so module m is written with rank r_m and
    alpha_m = c_m · r_m; the most common (r, alpha) become `r` / `lora_alpha`, and modules that
    differ go into `rank_pattern` / `alpha_pattern` (keyed by full module path).
    """
    layers = A.adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to export; call apply_method first")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        lora_A, lora_B, scale = layer.lora_factors()                  # (r, d_in), (d_out, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B
        ranks[name] = lora_A.shape[0]
        alphas[name] = _json_number(scale * lora_A.shape[0])
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "rank_pattern": {name: rm for name, rm in ranks.items() if rm != r},
        "alpha_pattern": {name: am for name, am in alphas.items() if am != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, PEFT_WEIGHTS_NAME), tensors)
    write_json(os.path.join(out_dir, PEFT_CONFIG_NAME), peft_config)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain base state dict (original keys and dtypes) with every adapter merged: W0 + ΔW,
    computed in fp32. Does not modify the model. A NaN/inf merged weight is a ValueError."""
    adapter_keys = set(A.adapter_state_dict(model))
    out = {k: v.detach() for k, v in model.state_dict().items() if k not in adapter_keys}
    for name, layer in A.adapter_layers(model).items():
        if layer.merged:
            continue  # self.weight already holds W0 + ΔW
        merged = layer.weight.float() + layer.delta_weight().to(layer.weight.device)
        if not torch.isfinite(merged).all():
            raise ValueError(f"{name}: merged weight has NaN/inf; the adapter is broken")
        out[f"{name}.weight"] = merged.to(layer.weight.dtype)
    return out


# --- the run folder of train.py (names in the module docstring) ----------------------------------

def adapter_config_path(adapter_dir) -> str:
    """The adapter.json of an adapter folder, or the adapter_config.json of one written before
    that name, when only the old file is there."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    legacy = os.path.join(adapter_dir, LEGACY_ADAPTER_CONFIG_NAME)
    return legacy if not os.path.exists(path) and os.path.exists(legacy) else path


def is_adapter_dir(folder) -> bool:
    """True if `folder` holds an adapter in this project's format (peft's folder does not)."""
    return (os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
            and os.path.isfile(adapter_config_path(folder)))


def read_run_config(run_dir) -> dict:
    """The settings a train.py run saved: run_config.json, or the config.json of an older run
    when it holds run settings (an older --method full run overwrote it with the model's HF
    config: {} then, as for a folder without settings)."""
    for name in (RUN_CONFIG_NAME, LEGACY_RUN_CONFIG_NAME):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                settings = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
        if isinstance(settings, dict) and "method" in settings and "model_type" not in settings:
            return settings
    return {}


def full_model_dir(run_dir) -> str | None:
    """The HF model folder of a --method full run (RUN/model/, or RUN itself in an older run),
    None when the run holds no whole model."""
    for folder in (os.path.join(run_dir, FULL_MODEL_DIR), str(run_dir)):
        if any(os.path.isfile(os.path.join(folder, name))
               for name in ("model.safetensors", "model.safetensors.index.json")):
            return folder
    return None
