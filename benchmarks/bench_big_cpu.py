"""
A 7B-shaped model on a 24 GB CPU machine: bf16 weight storage, fp32 compute block by block,
gradient checkpointing. Load time, peak memory and step time of LoRA, TriAdaptLoRA and CTR-LoRA
(not a test: prints figures, notes/scale.md records them).

    python benchmarks/bench_big_cpu.py                # llama2-7b, 32 layers, 13.5 GB of bf16
    python benchmarks/bench_big_cpu.py --preset llama2-13b --layers 2 --methods none
                                                      # load + forward only

1. If --ckpt does not exist, a synthetic checkpoint of the preset's shape (random weights, bf16,
   2 GB shards) is written there by synthetic_checkpoint.write_synthetic_checkpoint (default:
   checkpoints/synthetic-<preset>[-<L>layers]).
2. Each method runs in its own subprocess, so every peak is that method's alone:
      load   model.load_pretrained(ckpt, dtype=bfloat16, compute_dtype=float32). safetensors
             memory-maps the shards and the bf16 tensors are used in place, so this returns
             fast; the weights are read on first use.
      read   touch every page of every weight once (the disk/page-cache read the first step
             would otherwise do)
      steps  adapters.apply_method + adapters.training_hooks, gradient checkpointing on,
             batch 1 x --seq-len tokens, fused AdamW; per step, as train.py:
             before_micro_batch, loss.backward(), regularizer, clip, before_optimizer_step,
             optimizer.step, after_optimizer_step, zero_grad.
   "none" as a method: load, read and one no-grad forward on 8 tokens.
   Each step's wall time is printed with its CPU time (user + system, all threads) in brackets:
   on a shared machine the wall time also counts waiting for a core.
3. Peak memory: VmHWM of the subprocess (what ru_maxrss reports), plus the largest anonymous
   (RssAnon) and file-backed (RssFile: the memory-mapped bf16 weights, reclaimable page cache)
   parts seen by polling /proc every 0.1 s. The parent kills a subprocess whose resident memory
   passes --max-rss-gb, and does not start one while less than the checkpoint's size + 3 GiB is
   available (MemAvailable).
4. The children run with THP_MEM_ALLOC_ENABLE=1 (--no-thp: without): the fp32 copies are fresh
   allocations of hundreds of MB per block, and with 4 KiB pages their page faults cost more
   than the bf16 -> fp32 conversion.

The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def proc_status(pid="self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in GiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 2**20          # kB -> GiB
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# --------------------------------------------------------------------------------------------------
# the child: one method, one process
# --------------------------------------------------------------------------------------------------

def child(args) -> dict:
    import torch
    import adapters as A
    import model as M
    import train as T

    torch.set_num_threads(args.threads)
    row = {"method": args.child}
    t0 = time.perf_counter()
    net, tok = M.load_model_and_tokenizer(args.ckpt, torch.bfloat16, "cpu",
                                          compute_dtype=torch.float32)
    row["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # fault in every 4 KiB page of every weight once
    with torch.no_grad():
        touched = sum(float(p.view(-1)[::2048].float().sum()) for p in net.parameters())
    row["read_s"] = time.perf_counter() - t0
    row["rss_after_read_gib"] = proc_status()["VmRSS"]
    row["n_params"] = sum(p.numel() for p in net.parameters())
    assert touched == touched, "NaN in the weights"

    text = ("The quick brown fox jumps over the lazy dog, and the five boxing wizards jump "
            "quickly. " * 40)
    ids = torch.tensor([tok.encode(text, bos=True)[:args.seq_len]])           # (1, T)
    if args.child == "none":
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = net(ids[:, :8])
        row["forward_s"] = time.perf_counter() - t0
        row["logits_finite"] = bool(torch.isfinite(logits).all())
    else:
        labels = ids.roll(-1, dims=1)
        labels[:, -1] = -100                                                  # (1, T): next token
        n_label = int((labels != -100).sum())
        torch.manual_seed(0)
        cfg = A.AdapterConfig(method=args.child, r=8, alpha=16.0, targets=A.LLAMA_LINEAR_NAMES,
                              total_steps=args.steps)
        A.apply_method(net, args.child, cfg)
        net.grad_checkpoint = True
        net.train()
        params = A.optimizer_parameters(net)
        row["trainable"] = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        hooks = A.training_hooks(net, cfg)
        row["step_s"], row["step_cpu_s"], row["loss"] = [], [], []
        for step in range(args.steps):
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            loss = T.accumulate_gradients(net, [{"input_ids": ids, "labels": labels}], n_label,
                                          "cpu", method=hooks)           # train.py's step
            T.optimizer_step(optimizer, params, hooks, step, clip=1.0)
            row["step_s"].append(time.perf_counter() - t0)
            # < threads x wall when the CPUs are shared
            row["step_cpu_s"].append(cpu_seconds() - cpu0)
            row["loss"].append(loss)
        hooks.close()
        row["adapters_fp32"] = all(p.dtype == torch.float32 for p in params)
        row["base_bf16"] = all(p.dtype == torch.bfloat16 for p in net.parameters()
                               if not p.requires_grad)
    status = proc_status()
    row["vm_hwm_gib"] = status["VmHWM"]
    import resource
    # ru_maxrss: kB on Linux
    row["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


# --------------------------------------------------------------------------------------------------
# the parent: write the checkpoint if needed, run the children one at a time, watch their memory
# --------------------------------------------------------------------------------------------------

def run_watched(cmd: list[str], max_rss_gib: float,
                env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run cmd, polling its memory every 0.1 s; kill it (by its pid) if VmRSS passes
    max_rss_gib."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peaks = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    killed = False
    while proc.poll() is None:
        try:
            status = proc_status(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        for k in peaks:
            peaks[k] = max(peaks[k], status.get(k, 0.0))
        if status.get("VmRSS", 0.0) > max_rss_gib and not killed:
            proc.kill()
            killed = True
        time.sleep(0.1)
    out, err = proc.communicate()
    if killed:
        raise RuntimeError(f"killed {cmd[-1]}: resident memory passed --max-rss-gb {max_rss_gib}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peaks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="llama2-7b", help="shape of the synthetic checkpoint")
    ap.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="checkpoint folder (default: checkpoints/synthetic-<preset>[-<L>layers]); "
                         "written if absent")
    ap.add_argument("--methods", default="lora,triadapt,ctr",
                    help="comma-separated; 'none' = load and forward")
    ap.add_argument("--steps", type=int, default=2, help="training steps per method")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens in the one training sequence")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--max-rss-gb", type=float, default=20.0,
                    help="kill a subprocess above this (GiB)")
    ap.add_argument("--thp", action=argparse.BooleanOptionalAction, default=True,
                    help="run the children with THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator "
                         "then asks for transparent huge pages, and the per-block fp32 copies "
                         "page-fault 512x less often")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        print("RESULT " + json.dumps(child(args)))
        return
    if args.ckpt is None:
        suffix = f"-{args.layers}layers" if args.layers else ""
        args.ckpt = REPO / "checkpoints" / f"synthetic-{args.preset}{suffix}"
    rows = []
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  load average {os.getloadavg()}  "
          f"MemAvailable {mem_available_gib():.1f} GiB", file=sys.stderr)
    if not args.ckpt.exists():
        cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_checkpoint.py"), args.preset,
               str(args.ckpt)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        t0 = time.perf_counter()
        res, peaks = run_watched(cmd, args.max_rss_gb)
        if res.returncode:
            raise SystemExit(f"writing the checkpoint failed:\n{res.stderr}")
        rows.append({"method": "write checkpoint", "wall_s": time.perf_counter() - t0,
                     "peaks": peaks})
        print(res.stdout.strip(), file=sys.stderr)
    size_gb = sum(f.stat().st_size for f in args.ckpt.glob("*.safetensors")) / 1e9
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        # mapped weights + ~3 GiB of work
        avail, need = mem_available_gib(), size_gb * 1e9 / 2**30 + 3.0
        if avail < need:
            raise SystemExit(f"only {avail:.1f} GiB available, {method} needs about {need:.1f}; "
                             f"not started (wait for other jobs to finish)")
        cmd = [sys.executable, __file__, "--ckpt", str(args.ckpt), "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--child", method]
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if args.thp else "0")
        t0 = time.perf_counter()
        res, peaks = run_watched(cmd, args.max_rss_gb, env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            raise SystemExit(f"{method} failed:\n{res.stderr[-3000:]}")
        row = json.loads(line[0][len("RESULT "):])
        row.update(wall_s=time.perf_counter() - t0, peaks=peaks)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print(f"\n{args.ckpt} ({size_gb:.2f} GB of safetensors), batch 1 x {args.seq_len} tokens, "
          f"{args.threads} threads, THP_MEM_ALLOC_ENABLE={int(args.thp)}, "
          f"load average after: {tuple(round(x, 2) for x in os.getloadavg())}")
    print("| method | load s | read weights s | step times s (CPU s) | peak RSS GiB (VmHWM) "
          "| max RssAnon GiB | max RssFile GiB | process wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["peaks"]
        if r["method"] == "write checkpoint":
            print(f"| write checkpoint | | | | {p['VmRSS']:.2f} (polled) | {p['RssAnon']:.2f} "
                  f"| {p['RssFile']:.2f} | {r['wall_s']:.0f} |")
            continue
        steps = ", ".join(f"{s:.0f} ({c:.0f})"
                          for s, c in zip(r.get("step_s", []), r.get("step_cpu_s", []))) \
            or f"forward 8 tokens {r['forward_s']:.1f}"
        print(f"| {r['method']} | {r['load_s']:.1f} | {r['read_s']:.1f} | {steps} "
              f"| {r['vm_hwm_gib']:.2f} | {p['RssAnon']:.2f} | {p['RssFile']:.2f} "
              f"| {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
