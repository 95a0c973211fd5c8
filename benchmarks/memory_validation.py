"""
The memory estimate (memory.py) against the measured peak resident memory of real training
steps.

    python benchmarks/memory_validation.py    # the validation table of notes/memory.md (minutes)
    python benchmarks/memory_validation.py --methods ctr        # only CTR-LoRA's rows

Each configuration trains a few steps of a small random Llama on CPU, as train.py does (its
accumulate_gradients and optimizer_step), in a fresh subprocess, and reports the peak resident
memory above the process's baseline beside memory.py's estimate. tests/test_memory.py runs a small
case of the same measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import adapters as A  # noqa: E402
import memory  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

# Method: a fresh Python process with MALLOC_MMAP_THRESHOLD_=65536 (glibc then serves every block
# above 64 KiB with its own mmap and unmaps it on free, so the resident set follows the live
# tensors instead of heap fragmentation) and one thread (OMP_NUM_THREADS=1: spin-waiting threads
# make small ops slow on a busy machine; memory is the same but for per-thread scratch). After the
# imports, a warm-up run of the first configuration of each model shape (one-time set-up of
# kernels and BLAS packing buffers — 6 to 16 MiB in our runs — stays in the baseline). Then for
# each configuration: gc, malloc_trim(0) (else free heap pages left by the previous run stay
# resident, inflate the baseline and get reused: up to 30 MiB too low), read VmRSS as the
# baseline, reset the high-water mark (echo 5 > /proc/self/clear_refs), build the model, train
# (run_steps), report VmHWM − baseline.

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_steps(spec: dict) -> None:
    """Build the spec's model (random weights) and train as train.py does: one step on a short
    batch (it creates the optimizer state and the methods' statistics, so what follows is the
    steady state), then spec['steps'] steps on the full (batch_size, seq_len) batch."""
    cfg = M.LlamaConfig(**spec["config"])
    method, B, T = spec["method"], spec["batch_size"], spec["seq_len"]
    torch.manual_seed(0)
    wdtype = getattr(torch, spec.get("weights_dtype", "float32"))
    default = torch.get_default_dtype()
    # parameters born in the storage dtype
    torch.set_default_dtype(torch.float32 if method == "full" else wdtype)
    try:
        net = M.Llama(cfg)
    finally:
        torch.set_default_dtype(default)
    if spec.get("compute_dtype") and hasattr(net, "compute_dtype"):
        net.compute_dtype = getattr(torch, spec["compute_dtype"])
    for p in net.parameters():
        p.requires_grad_(method == "full")
    hooks = A.MethodHooks()
    if method != "full":
        acfg = A.AdapterConfig(method=method, **spec.get("adapter", {}))
        A.apply_method(net, method, acfg)
        for layer in A.adapter_layers(net).values():
            if isinstance(layer, A.TriAdaptLinear):                # the budgeted final structure
                layer.grow_to(memory.triadapt_final_rank(acfg))
        hooks = A.training_hooks(net, acfg)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    labels = ids.clone()
    if hooks.calibration_batches:
        hooks.calibrate([(ids, labels)] * hooks.calibration_batches)
    params = A.optimizer_parameters(net)
    opt = torch.optim.AdamW([{"params": params}], lr=1e-4, fused=True)
    net.grad_checkpoint = spec["grad_checkpoint"]
    net.train()
    accum = spec.get("grad_accum", 1)
    for step in range(1 + spec.get("steps", 1)):
        x, y = (ids[:1, :8], labels[:1, :8]) if step == 0 else (ids, labels)
        micro = [{"input_ids": x, "labels": y}] * accum            # (the same batch, accum times)
        train.accumulate_gradients(net, micro, accum * int((y != -100).sum()), "cpu",
                                   method=hooks)
        train.optimizer_step(opt, params, hooks, step, clip=1.0)
    hooks.close()


def _measure_here(specs: list[dict]) -> list[int]:
    import gc
    torch.set_num_threads(1)
    # warm-up: the first configuration of each shape, once
    for spec in {json.dumps(dict(s["config"], B=s["batch_size"], T=s["seq_len"])): s
                 for s in specs}.values():
        run_steps(spec)
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)   # glibc; elsewhere a no-op
    out = []
    for spec in specs:
        gc.collect()
        trim(0)                            # return freed heap pages of earlier runs to the system
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # reset VmHWM to the current RSS
        run_steps(spec)
        out.append((_status_kib("VmHWM") - base) * 1024)
        gc.collect()
    return out


def measure_peaks(specs: list[dict], timeout: float = 600) -> list[int]:
    """Peak resident bytes above the baseline of each spec's training steps, measured in one fresh
    subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-json",
                          json.dumps(specs)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def estimate_spec(spec: dict) -> dict:
    """estimate() for a measurement spec (same model, method and settings)."""
    cfg = M.LlamaConfig(**spec["config"])
    method = spec["method"]
    acfg = None if method == "full" else A.AdapterConfig(method=method, **spec.get("adapter", {}))
    wd = getattr(torch, spec.get("weights_dtype", "float32"))
    cd = getattr(torch, spec["compute_dtype"]) if spec.get("compute_dtype") else wd
    return memory._estimate(cfg, method, acfg, spec["batch_size"], spec["seq_len"], wd, cd,
                            spec["grad_checkpoint"], grad_accum=spec.get("grad_accum", 1))


# The validation model: ~25M parameters, shaped like a shrunken Llama 3 (GQA, untied head, large
# vocabulary).
VALIDATION_CONFIG = dict(vocab_size=16000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024)


def validation_specs(methods=("lora", "full"), batch_size: int = 2, seq_len: int = 512,
                     config: dict = VALIDATION_CONFIG, weights_dtype: str = "float32",
                     compute_dtype: str = "", grad_accum: int = 1,
                     **adapter_options) -> list[dict]:
    """One spec per (method, checkpointing): r = 16 on all seven linears, schedules short enough to
    act in the measured steps, CG-LoRA calibrating on one batch; TriAdaptLoRA is grown to its final
    rank first."""
    specs = []
    for method in methods:
        for ckpt in (False, True):
            adapter = {} if method == "full" else {
                "r": 16, "targets": list(A.LLAMA_LINEAR_NAMES), "total_steps": 10, "t_init": 0,
                "t_final": 0, "tri_warmup": 1, "tri_interval": 1, "tri_final": 9, "cg_batches": 1,
                **adapter_options}
            specs.append({"config": config, "method": method, "batch_size": batch_size,
                          "seq_len": seq_len, "grad_checkpoint": ckpt, "steps": 1,
                          "adapter": adapter, "weights_dtype": weights_dtype,
                          "compute_dtype": compute_dtype, "grad_accum": grad_accum})
    return specs




VALIDATION_RUNS = [   # (label, specs): notes/memory.md's validation table
    ("V=16000", lambda: validation_specs(memory.ALL_METHODS)),
    ("V=16000, CG-LoRA sketch mode", lambda: validation_specs(("cg",), cg_mode="sketch")),
    ("V=2000", lambda: validation_specs(("lora", "ctr", "full"),
                                        config=dict(VALIDATION_CONFIG, vocab_size=2000))),
    ("V=16000, bf16 weights, fp32 compute", lambda: validation_specs(
        ("lora", "ctr"), weights_dtype="bfloat16", compute_dtype="float32")),
    ("V=16000, grad-accum 2", lambda: validation_specs(("lora", "ctr"), grad_accum=2)),
]


def validate(methods=None) -> str:
    """Estimated vs measured peak (markdown rows) for the VALIDATION_RUNS (only `methods`' rows
    when given)."""
    rows = ["| model | method | grad ckpt | estimated | measured | error | peak phase (estimate) |",
            "|---|---|---|---:|---:|---:|---|"]
    for label, make in VALIDATION_RUNS:
        if "bf16" in label and not hasattr(M, "call_in_dtype"):
            continue
        specs = [s for s in make() if methods is None or s["method"] in methods]
        if not specs:
            continue
        for spec, peak in zip(specs, measure_peaks(specs, timeout=3600)):
            e = estimate_spec(spec)
            est = e["bytes"]["total"]
            rows.append(f"| {label} | {spec['method']} | "
                        f"{'on' if spec['grad_checkpoint'] else 'off'} | {memory.human(est)} | "
                        f"{memory.human(peak)} | {(est - peak) / peak:+.1%} | {e['peak_phase']} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description="memory.py's estimate against measured peaks: "
                                 "prints notes/memory.md's validation table (minutes; each row "
                                 "is also printed to stderr as it is measured)")
    ap.add_argument("--methods", nargs="+", choices=memory.ALL_METHODS,
                    help="only these methods' rows (default: every row)")
    ap.add_argument("--measure-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_json:
        print(json.dumps(_measure_here(json.loads(args.measure_json))))
        return
    print(validate(args.methods))


if __name__ == "__main__":
    main()
