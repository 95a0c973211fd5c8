r"""
Our LoRA training step against transformers + peft (tokens/s, peak memory), method overheads over
LoRA, and the achieved FLOP/s of our step against this machine's measured fp32 matmul peak.

    python benchmarks/bench_vs_peft.py          # SmolLM2-135M and tiny, 3 rounds (~9 min)
    python benchmarks/bench_vs_peft.py --workloads tiny --rounds 5
                                                # the tiny random model only (~4 min)
    python benchmarks/bench_vs_peft.py --workloads smollm2 --setups ours-lora peft-lora matmul \
        --experiments
    python benchmarks/bench_vs_peft.py --profile ours-lora
                                                # where one step's time goes (torch.profiler)

Workload: prompt/completion batches, batch 4 x 128 random tokens, loss on the last quarter of each
row (labels -100 on the first 3/4). Two models, each loaded by both implementations from the same
safetensors folder: `smollm2` (checkpoints/smollm2-135m) and `tiny` (the `tiny` preset, random
weights written to a temp folder). fp32, CPU, the same torch.set_num_threads in every process,
the same fused AdamW (torch.optim.AdamW(fused=True), which both can use), gradient clipping at
1.0 in both, all 7 linear types adapted, r = 8, α = 16, dropout 0.

Setups (each runs in its own subprocess, so that peak RSS is its own; setups alternate round by
round A B C ... A B C ...; medians over rounds are reported):

    ours-lora      model.py + adapters.py LoRA; one step = what train.py does per optimizer step
                   (train.accumulate_gradients, regularizer, clip, before/after_optimizer_step
                   hooks, zero_grad)
    peft-lora      transformers LlamaForCausalLM (sdpa attention) + peft LoraConfig; labels passed
                   the HF way (shifted inside the model, logits on every position); loss.backward,
                   clip, AdamW, zero_grad
    ours-adalora   r0 = 12 -> 8, masking every step (t_init = t_final = 0, delta_t = 1),
                   orth_reg 0.1
    peft-adalora   peft AdaLoraConfig(init_r 12, target_r 8, tinit 0, tfinal 0, deltaT 1,
                   orth_reg_weight 0.1), update_and_allocate after every optimizer step (the worst
                   case for both AdaLoRAs)
    ours-triadapt  grown to its end-of-run structure (a block of 4 + four blocks of 1 = r_ref 8
                   everywhere; the grown tensors in four extra optimizer groups, as train.py adds
                   them); no growth while measured
    ours-ctr       CTR-LoRA, kfac-diag metric, r0 = 12 -> 8, every train.py hook (statistics,
                   trust region, allocator with delta_t 10)
    ours-cg        CG-LoRA's initialization (train.py defaults: 8 calibration batches of the same
                   shape), timed against LoRA's time to first step (load + adapters + first step)
                   and against one LoRA step; in the first --cg-rounds rounds only (its
                   calibration alone costs as much as many LoRA steps)
    ours-lora-compiled  ours-lora with train.py --compile (Llama.compile_blocks: torch.compile'd
                   blocks); its first (warm-up) step compiles, reported as the compile time
    matmul         fp32 2048x2048 @ 2048x2048, the machine's measured matmul peak, in the same
                   rotation
    paired-adalora, paired-triadapt, paired-ctr (not in the default list): ours-lora and
                   ours-<method> built in one worker, their measured steps alternating
                   L M M L L M …; each pair's ratio M / L is reported (median over all pairs).
                   The method overheads above divide medians of workers that run minutes apart;
                   this machine drifts ~10 % over minutes, which the pairing cancels. Peak memory
                   is not reported for these (two models share the process).
    --experiments  adds hot-path changes not in the project, applied by monkeypatch in the worker
                   (patch_* below): ours-lora-unfused, ours-triadapt-unfused (the plain-ops
                   reference forward instead of adapters.LowRankLinearFunction: what the fused
                   path gains); ours-lora-repeatkv (GQA by repeating k, v instead of SDPA's
                   enable_gqa)

Peak memory = VmHWM of the worker (peak RSS, reset after imports) minus its RSS after imports
(torch, transformers, peft and the project modules are imported by every worker): weights +
adapters + optimizer + the step's peak. FLOPs of our step (model FLOPs, counted from shapes, see
step_flops): frozen linears forward + input gradient, LM head forward + input gradient on
labelled positions only, causal attention (QKᵀ and PV, forward + backward), adapters (forward +
weight and input gradients). Elementwise work (norms, SiLU, softmax, RoPE, AdamW) not counted.
The achieved FLOP/s is compared with the matmul rate twice: against the `matmul` setup's median
(its workers run minutes apart from ours), and step by step against 3 matmuls the ours-lora
workers time right after each measured step (same process, same seconds: this machine's speed
drifts by ~10 % over minutes, which the pairing cancels). Not a test: prints figures, and
whether the goals (OVERHEAD_GOALS, and those report() prints) are met. The machine may be
shared: before each worker the script waits (up to --idle-wait s) for the machine to be >= 90%
idle, and reports for every setup the largest share of CPU time that other processes (and the
hypervisor, "steal") took while its workers ran; with 2 threads a busy neighbour stalls every
parallel region, so a figure measured beside one is not worth keeping.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETUPS = ("ours-lora", "peft-lora", "ours-adalora", "peft-adalora", "ours-triadapt", "ours-ctr",
          "ours-cg", "ours-lora-compiled", "matmul")
# --experiments: hot-path changes tried by monkeypatch (not in the project): see patch_* below
EXPERIMENTS = ("ours-lora-unfused", "ours-triadapt-unfused", "ours-lora-repeatkv")
# ours-lora and a method in one worker, step by step
PAIRED = ("paired-adalora", "paired-triadapt", "paired-ctr")
RANK, ALPHA = 8, 16.0
OVERHEAD_GOALS = {"ours-triadapt": 1.10, "ours-ctr": 1.25}     # step time over our LoRA's
PROBE_REPS = 3          # matmuls timed after each measured step of ours-lora / ours-lora-compiled
TOTAL_STEPS = 10_000   # schedule length for the rank-allocating methods (no run reaches its end)


# --------------------------------------------------------------------------------------------------
# Memory of this process (Linux /proc; ru_maxrss as a fallback)

def status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process in MiB, from
    /proc/self/status; where that is missing, ru_maxrss (the peak) stands in for both."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs). False if
    not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# The workload: one prompt/completion batch, labels in both conventions

def make_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    """Random tokens (B, T); loss on the last quarter of each row.

    hf_labels[b, t] = ids[b, t] for t >= P (P = 3T/4), -100 before: transformers shifts them
    inside the model (position t predicts hf_labels[t + 1]). Ours: labels[b, t] is the token
    position t predicts, so labels[:, t] = hf_labels[:, t + 1] and the last position has none.
    Both are the same T - P targets per row.
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)                     # (B, T)
    prompt = seq * 3 // 4
    hf_labels = ids.clone()
    hf_labels[:, :prompt] = -100
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    return ids, labels, hf_labels


def write_tiny_checkpoint(out_dir: Path) -> Path:
    """The `tiny` preset with random weights (seed 0), as an HF-format folder both implementations
    load."""
    import torch
    import model as M
    torch.manual_seed(0)
    cfg = M.preset_config("tiny")
    net = M.Llama(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.normal_(1.0, 0.1)                                  # not all ones: a real test
    M.save_pretrained(net.state_dict(), cfg, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Model FLOPs of our step, from shapes

def step_flops(cfg, batch: int, seq: int, n_label: int, rank: int,
               adapted: tuple[str, ...]) -> dict[str, float]:
    """FLOPs of one training step of our LoRA model (multiply-add = 2 FLOPs), by component.

    linear_forward   2 · tokens · Σ d_in·d_out over the 7 frozen linears of every block
    linear_input_grad  the same for ∂L/∂x = ∂L/∂y · W (frozen: no weight gradient), except layer
                     0's q/k/v, whose input (the frozen embedding) needs no gradient, so autograd
                     skips it
    head             4 · n_label · d · vocab: forward + input gradient, on labelled positions only
                     (our model)
    attention        QKᵀ and PV over the causal triangle, T(T+1)/2 (query, key) pairs per
                     sequence and head: 2 matmuls · 2 · head_dim forward, twice that backward
                     (dQ, dK, dV, dP)
    adapter          6 · tokens · r (d_in + d_out) per adapted linear: forward, weight and input
                     gradients
    """
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    H, Hkv, d, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    # (d_in, d_out)
    shapes = {"q_proj": (C, H * d), "k_proj": (C, Hkv * d), "v_proj": (C, Hkv * d),
              "o_proj": (H * d, C), "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}
    tokens = batch * seq
    per_layer = sum(a * b for a, b in shapes.values())
    layer0_qkv = sum(a * b for k, (a, b) in shapes.items() if k in ("q_proj", "k_proj", "v_proj"))
    pairs = batch * seq * (seq + 1) // 2
    adapter = sum(rank * (a + b) for k, (a, b) in shapes.items() if k in adapted) * L
    out = {"linear_forward": 2.0 * tokens * per_layer * L,
           "linear_input_grad": 2.0 * tokens * (per_layer * L - layer0_qkv),
           "head": 4.0 * n_label * C * V,
           "attention": 3 * 2 * 2.0 * d * H * pairs * L,
           "adapter": 6.0 * tokens * adapter}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------------
# Worker side: build one setup, run it, report JSON on stdout

def patch_unfused():
    """Experiment: every adapted layer on AdaptedLinear.reference_forward (plain ops: F.linear for
    W0, A and B, then a scale and an add) instead of the fused LowRankLinearFunction — what the
    fused path gains."""
    import adapters as A
    A.AdaptedLinear.fused = False


def patch_repeat_kv():
    """Experiment: grouped-query attention with k and v repeated to every query head
    (repeat_interleave copies, saved for backward) instead of SDPA's enable_gqa."""
    import types
    import torch.nn.functional as F
    import model as M
    sdpa = F.scaled_dot_product_attention

    def repeated(q, k, v, *args, enable_gqa=False, **kwargs):
        if enable_gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return sdpa(q, k, v, *args, **kwargs)
    M.F = types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": repeated})


def apply_experiment(method: str) -> str:
    """Apply the monkeypatches an experiment setup names ("lora-unfused" -> patch_unfused); return
    the method."""
    patches = {"lora-unfused": [patch_unfused], "triadapt-unfused": [patch_unfused],
               "lora-repeatkv": [patch_repeat_kv]}
    for patch in patches.get(method, []):
        patch()
    return method.split("-")[0]


def parse_setup(setup: str) -> tuple[str, str, bool]:
    """'ours-lora-compiled' -> ('ours', 'lora', True); experiments' monkeypatches are applied
    here."""
    impl, method = setup.split("-", 1)
    compiled = method.endswith("-compiled")
    return impl, apply_experiment(method.removesuffix("-compiled")), compiled


def build_ours(path: Path, method: str, compiled: bool = False):
    """Our model + adapters + hooks + fused AdamW (+ train.py's --compile when compiled); returns
    (net, step(ids, labels) -> loss, hooks, cfg)."""
    import torch
    import adapters as A
    import model as M
    import train as T
    net = M.load_pretrained(path, torch.float32, "cpu")
    torch.manual_seed(0)
    options = dict(method=method, r=RANK, alpha=ALPHA, targets=A.LLAMA_LINEAR_NAMES,
                   total_steps=TOTAL_STEPS)
    if method in ("adalora", "triadapt"):
        options.update(orth_reg=0.1)
    if method == "adalora":
        options.update(init_rank=12, target_rank=RANK, t_init=0, t_final=0, delta_t=1)
    if method == "ctr":
        options.update(init_rank=12, target_rank=RANK, t_init=0, t_final=0, delta_t=10,
                       ctr_metric="kfac-diag")
    if method == "triadapt":
        options.update(tri_init_rank=4, tri_block=1, tri_warmup=TOTAL_STEPS - 1, tri_interval=1,
                       tri_final=TOTAL_STEPS)                         # no growth while measured
    cfg = A.AdapterConfig(**options)
    A.apply_method(net, method, cfg)
    params = A.optimizer_parameters(net)
    optimizer = torch.optim.AdamW([{"params": params}], lr=1e-4, weight_decay=0.0, fused=True)
    if method == "triadapt":                                          # its end-of-run structure
        layers = list(A.adapter_layers(net).values())
        while layers[0].rank < RANK:
            grown = [p for layer in layers for p in layer.grow()]
            optimizer.add_param_group({"params": grown})
            params += grown
    hooks = A.training_hooks(net, cfg)
    if compiled:
        net.compile_blocks()                                          # compiles in the first step
    net.train()
    state = {"t": 0}

    def step(ids, labels):                                            # train.py's step, one process
        n_label = int((labels != -100).sum())
        loss = T.accumulate_gradients(net, [{"input_ids": ids, "labels": labels}], n_label, "cpu",
                                      method=hooks)
        # (the regularizer is in loss)
        T.optimizer_step(optimizer, params, hooks, state["t"], clip=1.0)
        state["t"] += 1
        return loss

    return net, step, hooks, cfg


def build_peft(path: Path, method: str):
    """transformers' Llama + peft + fused AdamW; returns (net, step(ids, hf_labels) -> loss)."""
    import peft
    import torch
    from transformers import LlamaForCausalLM
    import adapters as A
    base = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "lora":
            config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                     target_modules=A.LLAMA_LINEAR_NAMES, task_type="CAUSAL_LM")
        else:
            config = peft.AdaLoraConfig(init_r=12, target_r=RANK, lora_alpha=ALPHA,
                                        lora_dropout=0.0, tinit=0, tfinal=0, deltaT=1,
                                        total_step=TOTAL_STEPS, orth_reg_weight=0.1,
                                        target_modules=A.LLAMA_LINEAR_NAMES, task_type="CAUSAL_LM")
        net = peft.get_peft_model(base, config)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    state = {"t": 0}

    def step(ids, hf_labels):
        # mean over label tokens (+ AdaLoRA's penalty, by peft)
        loss = net(input_ids=ids, labels=hf_labels).loss
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if method == "adalora":
            net.base_model.update_and_allocate(state["t"] + 1)
        optimizer.zero_grad(set_to_none=True)
        state["t"] += 1
        return value

    return net, step


class MatmulProbe:
    """fp32 2048 x 2048 @ 2048 x 2048 into a preallocated output; rate() times `reps` of them
    (median FLOP/s)."""

    def __init__(self, n: int = 2048):
        import torch
        g = torch.Generator().manual_seed(0)
        self.n, self.a, self.b = n, torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.out = torch.empty(n, n)
        for _ in range(2):
            torch.mm(self.a, self.b, out=self.out)

    def rates(self, reps: int) -> list[float]:
        import torch
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            out.append(2 * self.n ** 3 / (time.perf_counter() - start))
        return out


def run_matmul(args) -> dict:
    return {"flops_per_s": MatmulProbe().rates(args.matmul_reps)}


def run_paired(args) -> dict:
    """paired-<method>: ours-lora and ours-<method> in this one process, warmed up, then measured
    steps in the order L M, M L, L M, … (one pair per --steps), so that both steps of a pair see
    the same seconds of the machine."""
    import model as M
    path = Path(args.model)
    ids, labels, _ = make_batch(M.LlamaConfig.from_json(path / "config.json").vocab_size,
                                args.batch, args.seq)
    method = args.setup.split("-", 1)[1]
    times: dict[str, list[float]] = {"lora": [], method: []}
    with contextlib.redirect_stderr(io.StringIO()):
        steps = {"lora": build_ours(path, "lora")[1], method: build_ours(path, method)[1]}
        for _ in range(args.warmup):
            for step in steps.values():
                step(ids, labels)
        for i in range(args.steps):
            for name in (("lora", method) if i % 2 == 0 else (method, "lora")):
                start = time.perf_counter()
                steps[name](ids, labels)
                times[name].append(time.perf_counter() - start)
    return {"step_s": times[method], "lora_step_s": times["lora"]}


def worker(args) -> dict:
    """One setup in this process: imports, baseline RSS, build, warm-up, measured steps, peak
    RSS."""
    import torch
    torch.set_num_threads(args.threads)
    if args.setup == "matmul":
        return run_matmul(args)
    if args.setup.startswith("paired-"):
        return run_paired(args)
    # (every worker imports the same modules: the RSS baseline is comparable)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import adapters  # noqa: F401
    import model as M
    import train  # noqa: F401
    # our LoRA setups also time PROBE_REPS matmuls after each step: the achieved FLOP/s of a step
    # is then compared with the matmul rate of the same seconds (allocated before the RSS
    # baseline; run between steps, when the step's activations are freed, so the peak is the
    # step's)
    probe = MatmulProbe() if args.setup in ("ours-lora", "ours-lora-compiled") else None
    base_rss = status_mib("VmRSS")
    reset_peak_rss()
    path = Path(args.model)
    cfg = M.LlamaConfig.from_json(path / "config.json")
    ids, labels, hf_labels = make_batch(cfg.vocab_size, args.batch, args.seq)
    impl, method, compiled = parse_setup(args.setup)
    quiet = contextlib.redirect_stderr(io.StringIO())        # allocation lines, peft warnings
    t0 = time.perf_counter()
    info = {}
    with quiet:
        if impl == "ours":
            net, step, hooks, _ = build_ours(path, method, compiled)
            t_build = time.perf_counter() - t0
            if method == "cg":                   # CG-LoRA: the data-dependent init, train.py's way
                batches = [make_batch(cfg.vocab_size, args.batch, args.seq, seed=1 + i)[:2]
                           for i in range(hooks.calibration_batches)]
                t1 = time.perf_counter()
                cal = hooks.calibrate(batches)
                info.update(cg_init_s=time.perf_counter() - t1, cg_mode=cal.get("cg_mode"),
                            cg_batches=len(batches))
            batch_labels = labels
        else:
            net, step = build_peft(path, method)
            batch_labels = hf_labels
            t_build = time.perf_counter() - t0
    rss_built = status_mib("VmRSS") - base_rss               # (ours-cg: after its calibration)
    times, cpu_times, losses, probes = [], [], [], []
    with quiet:
        for i in range(args.warmup + args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            losses.append(float(step(ids, batch_labels)))
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            if probe is not None and i >= args.warmup:
                probes.append(median(probe.rates(PROBE_REPS)))
    if probes:
        info["probe_flops_per_s"] = probes
    del net
    return {"build_s": t_build, "first_step_s": times[0], "warmup_s": times[:args.warmup],
            "step_s": times[args.warmup:], "cpu_s": cpu_times[args.warmup:],
            "first_loss": losses[0], "rss_built_mib": rss_built,
            "peak_mib": status_mib("VmHWM") - base_rss, "tokens_per_step": ids.numel(),
            "n_label": int((labels != -100).sum()), **info}


def profile(args) -> None:
    """One step of a setup under torch.profiler (after warm-up): the operators where its time
    goes."""
    import torch
    torch.set_num_threads(args.threads)
    import model as M
    path = Path(args.model)
    cfg = M.LlamaConfig.from_json(path / "config.json")
    ids, labels, hf_labels = make_batch(cfg.vocab_size, args.batch, args.seq)
    impl, method, compiled = parse_setup(args.profile)
    with contextlib.redirect_stderr(io.StringIO()):
        if impl == "ours":
            _, step, _, _ = build_ours(path, method, compiled)
            batch_labels = labels
        else:
            _, step = build_peft(path, method)
            batch_labels = hf_labels
        for _ in range(max(args.warmup, 1)):
            step(ids, batch_labels)
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            step(ids, batch_labels)
            wall = time.perf_counter() - start
    print(f"{args.profile} on {path.name}: one step {wall:.3f} s "
          f"(profiled; the profiler adds overhead)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    # matrix products by shape (m x k @ k x n): where the GEMM time goes and at what rate
    gemms: dict[str, list] = {}
    for e in prof.events():
        first = 0 if e.name == "aten::mm" else 1                      # addmm(input, mat1, mat2)
        if (e.name in ("aten::mm", "aten::addmm", "aten::addmm_")
                and len(e.input_shapes) >= first + 2):
            (m, k), (_, n) = e.input_shapes[first], e.input_shapes[first + 1]
            key = ("rank-r products (min dim <= 16)" if min(m, k, n) <= 16
                   else f"{m} x {k} @ {k} x {n}")
            row = gemms.setdefault(key, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += e.self_cpu_time_total / 1e6
            row[2] += 2.0 * m * k * n
    total = sum(r[1] for r in gemms.values())
    print(f"matrix products: {total:.3f} s of the step (self CPU time)")
    for key, (calls, seconds, flops) in sorted(gemms.items(), key=lambda kv: -kv[1][1]):
        print(f"  {key:<34} {calls:5d} calls {seconds:7.3f} s {flops / 1e9:8.2f} GFLOP "
              f"{flops / seconds / 1e9 if seconds else 0:7.1f} GFLOP/s")


# --------------------------------------------------------------------------------------------------
# Orchestrator: alternate the setups round by round, each in a fresh subprocess

def cpu_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) CPU time of the whole machine so far, in clock ticks (/proc/stat; zeros
    if unavailable). steal: time the hypervisor ran something else while one of our virtual CPUs
    wanted to run."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)                  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    return sum(values) - idle - steal, steal, sum(values)


def wait_until_idle(max_wait_s: float, idle_fraction: float = 0.9,
                    window_s: float = 2.0) -> float:
    """Sleep until the machine was >= idle_fraction idle over a window (other jobs between our
    workers), at most max_wait_s. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        busy0, steal0, total0 = cpu_ticks()
        time.sleep(window_s)
        busy1, steal1, total1 = cpu_ticks()
        if (total1 == total0
                or (busy1 + steal1 - busy0 - steal0) / (total1 - total0) <= 1 - idle_fraction):
            break
    return time.perf_counter() - start


def run_worker(setup: str, model_path: Path, args, steps: int) -> dict:
    import resource
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setup,
           "--model", str(model_path), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads), "--steps", str(steps), "--warmup", str(args.warmup),
           "--matmul-reps", str(args.matmul_reps)]
    waited = wait_until_idle(args.idle_wait) if args.idle_wait > 0 else 0.0
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0, total0 = cpu_ticks()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    busy1, steal1, total1 = cpu_ticks()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {setup} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    # the worker's CPU seconds
    own = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    ticks_per_s = (total1 - total0) / wall if total1 > total0 else 1.0    # = CPUs x clock rate
    others = max(0.0, (busy1 - busy0) / ticks_per_s - own) if total1 > total0 else float("nan")
    # other processes' CPU use while this worker ran, as a fraction of the machine (0 = we had it
    # to ourselves)
    machine = wall * (os.cpu_count() or 1)
    result.update(wall_s=wall, waited_s=waited, others_share=others / machine,
                  steal_share=((steal1 - steal0) / ticks_per_s / machine if total1 > total0
                               else float("nan")))
    return result


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=ROOT)
        changed = [ln[3:] for ln in dirty.stdout.splitlines()]
        return head.stdout.strip() + (f" + uncommitted changes to {', '.join(changed)}"
                                      if changed else "")
    except OSError:
        return "unknown"


def overhead_goal(setup: str, ratio: float) -> str:
    """'   (goal <= 1.10: met)' for a setup with an overhead goal in OVERHEAD_GOALS, else ''."""
    if setup not in OVERHEAD_GOALS:
        return ""
    return (f"   (goal <= {OVERHEAD_GOALS[setup]:.2f}: "
            f"{'met' if ratio <= OVERHEAD_GOALS[setup] else 'NOT met'})")


def report(name: str, path: Path, results: dict[str, list[dict]], args) -> dict:
    """Print the tables of one workload; return the figures the goals are judged on."""
    import adapters as A
    import model as M
    cfg = M.LlamaConfig.from_json(path / "config.json")
    tokens = args.batch * args.seq
    paired = {s: rs for s, rs in results.items() if s.startswith("paired-")}
    step_s = {s: [median(r["step_s"]) for r in rs] for s, rs in results.items()
              if s != "matmul" and s not in paired}
    med_step = {s: median(v) for s, v in step_s.items()}
    print(f"\n=== {name} ({path}) — batch {args.batch} x {args.seq} tokens, "
          f"loss on the last quarter "
          f"({args.batch * (args.seq - args.seq * 3 // 4)} label tokens), {args.threads} threads, "
          f"{args.rounds} rounds")
    if step_s:                          # (a run of paired setups only has no per-setup table)
        width = max(26, 7 * args.rounds)
        print(f"{'setup':<20} {'median s/step':>13} {'per-round medians (s)':>{width}} "
              f"{'tokens/s':>9} {'CPU s/step':>10} {'peak MiB':>9} {'after load MiB':>15} "
              f"{'1st loss':>10} {'others':>7} {'steal':>6}")
        for s, rs in results.items():
            if s == "matmul" or s in paired:
                continue
            rounds = ", ".join(f"{x:.3f}" for x in step_s[s])
            cpu = median([median(r["cpu_s"]) for r in rs])
            print(f"{s:<20} {med_step[s]:>13.4f} {rounds:>{width}} {tokens / med_step[s]:>9.0f} "
                  f"{cpu:>10.3f} {median([r['peak_mib'] for r in rs]):>9.0f} "
                  f"{median([r['rss_built_mib'] for r in rs]):>15.0f} "
                  f"{rs[0]['first_loss']:>10.6f} {max(r['others_share'] for r in rs):>7.0%} "
                  f"{max(r['steal_share'] for r in rs):>6.0%}")
        print("(others / steal: the largest share of the machine's CPU time that other processes "
              "used / the hypervisor took while a worker of this setup ran; 'CPU s/step' is the "
              "worker's own CPU time, all threads)")
    figures = {}
    if "ours-lora" in med_step and "peft-lora" in med_step:
        ours, theirs = results["ours-lora"][0]["first_loss"], results["peft-lora"][0]["first_loss"]
        speed = med_step["peft-lora"] / med_step["ours-lora"]
        mem_ours = median([r["peak_mib"] for r in results["ours-lora"]])
        mem_peft = median([r["peak_mib"] for r in results["peft-lora"]])
        figures.update(speedup=speed, mem_ratio=mem_ours / mem_peft, loss_diff=abs(ours - theirs))
        print(f"\nsame loss: first-step loss ours {ours:.6f}, transformers + peft {theirs:.6f}, "
              f"|difference| {abs(ours - theirs):.1e} "
              f"(B = 0 at init: both are the base model's loss)")
        print(f"LoRA tokens/s, ours / transformers + peft: {speed:.3f}x   (goal >= 1.2x: "
              f"{'met' if speed >= 1.2 else 'NOT met'})")
        print(f"LoRA peak memory, ours / transformers + peft: {mem_ours:.0f} / {mem_peft:.0f} MiB "
              f"= {mem_ours / mem_peft:.3f}x   "
              f"(goal <= 1: {'met' if mem_ours <= mem_peft else 'NOT met'})")
    if "ours-lora" in med_step:
        lora = med_step["ours-lora"]
        print("\nstep time relative to LoRA of the same implementation (ratio of medians):")
        for s in ("ours-adalora", "ours-triadapt", "ours-ctr", "ours-lora-unfused",
                  "ours-triadapt-unfused", "ours-lora-repeatkv"):
            if s in med_step:
                ratio = med_step[s] / lora
                figures[s] = ratio
                print(f"  {s:<16} / ours-lora = {ratio:.3f}{overhead_goal(s, ratio)}")
        if "peft-adalora" in med_step and "peft-lora" in med_step:
            ratio = med_step["peft-adalora"] / med_step["peft-lora"]
            figures["peft-adalora"] = ratio
            print(f"  {'peft-adalora':<16} / peft-lora = {ratio:.3f}")
            if "ours-adalora" in figures:
                met = figures["ours-adalora"] <= ratio
                print(f"  AdaLoRA overhead, ours {figures['ours-adalora']:.3f} vs peft {ratio:.3f} "
                      f"(goal ours <= peft: {'met' if met else 'NOT met'})")
        if "ours-lora-unfused" in med_step and "peft-lora" in med_step:
            figures["unfused_speedup"] = med_step["peft-lora"] / med_step["ours-lora-unfused"]
            mem = median([r["peak_mib"] for r in results["ours-lora-unfused"]])
            mem_peft = median([r["peak_mib"] for r in results["peft-lora"]])
            print(f"  with ours-lora-unfused: tokens/s vs transformers + peft "
                  f"{figures['unfused_speedup']:.3f}x, peak memory {mem / mem_peft:.3f}x")
        if "ours-lora-compiled" in med_step:
            runs = results["ours-lora-compiled"]
            compile_s = median([r["first_step_s"] for r in runs]) - med_step["ours-lora-compiled"]
            mem = median([r["peak_mib"] for r in runs])
            figures["ours-lora-compiled"] = med_step["ours-lora-compiled"] / lora
            line = (f"  with --compile: {lora / med_step['ours-lora-compiled']:.3f}x "
                    f"the eager step's tokens/s; first step {compile_s:.1f} s longer "
                    f"(compilation); peak memory {mem:.0f} MiB")
            if "peft-lora" in med_step:
                figures["compiled_speedup"] = med_step["peft-lora"] / med_step["ours-lora-compiled"]
                mem_peft = median([r["peak_mib"] for r in results["peft-lora"]])
                line += (f"; vs transformers + peft: tokens/s {figures['compiled_speedup']:.3f}x, "
                         f"peak memory {mem / mem_peft:.3f}x")
            print(line)
        if "ours-cg" in results:
            cg = results["ours-cg"]
            init = median([r["cg_init_s"] for r in cg])
            ttfs_cg = median([r["build_s"] + r["cg_init_s"] + r["first_step_s"] for r in cg])
            ttfs_lora = median([r["build_s"] + r["first_step_s"] for r in results["ours-lora"]])
            figures.update(cg_init_steps=init / lora, cg_ttfs=ttfs_cg / ttfs_lora)
            print(f"\nCG-LoRA init ({cg[0]['cg_mode']} mode, {cg[0]['cg_batches']} calibration "
                  f"batches of the same shape): {init:.2f} s = {init / lora:.1f} LoRA steps; "
                  f"time to first step (load + adapters [+ calibration] + first step) "
                  f"CG {ttfs_cg:.2f} s vs LoRA {ttfs_lora:.2f} s = {ttfs_cg / ttfs_lora:.2f}x")
    if paired:
        print("\nstep time relative to LoRA, paired: ours-lora and the method in one worker, "
              "step by step (median and range of the per-pair ratios):")
        for s, rs in paired.items():
            name = "ours-" + s.split("-", 1)[1]
            ratios = [m / l for r in rs for m, l in zip(r["step_s"], r["lora_step_s"])]
            figures[s] = median(ratios)
            steps_m = median([t for r in rs for t in r["step_s"]])
            steps_l = median([t for r in rs for t in r["lora_step_s"]])
            print(f"  {name:<16} / ours-lora = {median(ratios):.3f} over {len(ratios)} pairs "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f}; "
                  f"median steps {steps_m:.3f} / {steps_l:.3f} s)"
                  f"{overhead_goal(name, median(ratios))}")
    if "ours-lora" in med_step:
        flops = step_flops(cfg, args.batch, args.seq, args.batch * (args.seq - args.seq * 3 // 4),
                           RANK, tuple(A.LLAMA_LINEAR_NAMES))
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items() if k != "total")
        print(f"\nFLOPs of one step (GFLOP, from shapes): {parts}; "
              f"total {flops['total'] / 1e9:.2f} "
              f"({flops['total'] / tokens / 1e6:.1f} MFLOP per token)")
        ours = [("ours-lora", "our LoRA step", "mfu"),
                ("ours-lora-compiled", "our LoRA step with --compile", "mfu_compiled")]
        # 1. against the matmul setup of the same rounds
        if "matmul" in results:
            per_round = [median(r["flops_per_s"]) for r in results["matmul"]]
            peak = median(per_round)
            best = max(max(r["flops_per_s"]) for r in results["matmul"])
            print(f"fp32 matmul 2048^3: median {peak / 1e9:.1f} GFLOP/s (per-round medians "
                  f"{', '.join(f'{x / 1e9:.1f}' for x in per_round)}; "
                  f"best single {best / 1e9:.1f})")
            for s, what, key in ours:
                if s in med_step:
                    achieved = flops["total"] / med_step[s]
                    figures[key] = achieved / peak
                    print(f"{what}: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} "
                          f"of the median matmul rate "
                          f"({achieved / best:.1%} of the best single matmul)   "
                          f"(goal >= 70%: {'met' if achieved >= 0.7 * peak else 'NOT met'})")
        # 2. step by step, against the matmuls timed right after it
        for s, what, key in ours:
            pairs = [flops["total"] / t / p for r in results.get(s, [])
                     for t, p in zip(r["step_s"], r.get("probe_flops_per_s", []))]
            if pairs:
                probe = median([p for r in results[s] for p in r["probe_flops_per_s"]])
                figures[key + "_paired"] = median(pairs)
                print(f"{what}, each step against the {PROBE_REPS} matmuls timed right after it "
                      f"in the same worker: median {median(pairs):.1%} over {len(pairs)} steps "
                      f"(range {min(pairs):.1%}-{max(pairs):.1%}; "
                      f"those matmuls' median {probe / 1e9:.1f} GFLOP/s)   (goal >= 70%: "
                      f"{'met' if median(pairs) >= 0.7 else 'NOT met'})")
        if "peft-lora" in med_step:
            hf = dict(flops, head=4.0 * tokens * cfg.hidden_size * cfg.vocab_size)
            hf_total = sum(v for k, v in hf.items() if k != "total")
            print(f"(transformers + peft executes {hf_total / 1e9:.2f} GFLOP per step "
                  f"— the head on all {tokens} positions —: "
                  f"{hf_total / med_step['peft-lora'] / 1e9:.1f} GFLOP/s executed)")
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--workloads", nargs="+", default=["smollm2", "tiny"],
                    choices=["smollm2", "tiny"])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS),
                    choices=list(SETUPS + EXPERIMENTS + PAIRED), metavar="SETUP",
                    help=f"setups to alternate, from: {', '.join(SETUPS + EXPERIMENTS + PAIRED)} "
                         f"(default: all but the experiments and the paired setups)")
    ap.add_argument("--experiments", action="store_true",
                    help=f"also run {', '.join(EXPERIMENTS)} "
                         f"(hot-path changes tried by monkeypatch)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each runs every setup once, in a fresh process")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per worker on smollm2")
    ap.add_argument("--tiny-steps", type=int, default=30, help="measured steps per worker on tiny")
    ap.add_argument("--cg-rounds", type=int, default=1,
                    help="rounds that include ours-cg (its calibration alone "
                         "takes ~16 LoRA steps on smollm2)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured steps per worker before measuring (the second "
                         "step is already as fast as the later ones)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128,
                    help="tokens per sequence (the last quarter carries the loss)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    ap.add_argument("--matmul-reps", type=int, default=10,
                    help="timed 2048^3 matmuls per matmul worker")
    ap.add_argument("--idle-wait", type=float, default=120.0,
                    help="before each worker, wait up to this many seconds for the machine to be "
                         ">= 90%% idle (0: never wait); other processes' CPU share during each "
                         "worker is reported either way")
    ap.add_argument("--smollm2", default="smollm2-135m",
                    help="checkpoint folder or name under checkpoints/")
    ap.add_argument("--json", metavar="PATH", help="also write every worker's raw results to PATH")
    profilable = [s for s in SETUPS + EXPERIMENTS if "-" in s and s != "ours-cg"]
    ap.add_argument("--profile", metavar="SETUP", choices=profilable,
                    help="instead of the benchmark: profile one step of SETUP "
                         "(on --workloads' first model)")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.setup = args.worker
        print("RESULT " + json.dumps(worker(args)))
        return
    import model as M
    with tempfile.TemporaryDirectory(prefix="bench_vs_peft_") as tmp:
        paths = {"smollm2": lambda: M.resolve_checkpoint(args.smollm2),
                 "tiny": lambda: write_tiny_checkpoint(Path(tmp) / "tiny")}
        if args.profile:
            args.model = str(paths[args.workloads[0]]())
            profile(args)
            return
        setups = list(args.setups) + ([e for e in EXPERIMENTS if e not in args.setups]
                                      if args.experiments else [])
        load_before = os.getloadavg()
        started = time.perf_counter()
        print(f"bench_vs_peft: {time.strftime('%Y-%m-%d %H:%M')}, code at {git_state()}; "
              f"{os.cpu_count()} CPUs, load average before {load_before[0]:.2f} "
              f"{load_before[1]:.2f} {load_before[2]:.2f}; "
              f"fused AdamW in every setup; setups in order {' '.join(setups)}")
        all_figures, waited, raw = {}, 0.0, {}
        for name in args.workloads:
            path = Path(paths[name]())
            steps = args.steps if name == "smollm2" else args.tiny_steps
            results: dict[str, list[dict]] = {s: [] for s in setups}
            for r in range(args.rounds):
                line = []
                for s in setups:                                   # A B C ... in every round
                    if s == "ours-cg" and r >= args.cg_rounds:
                        continue
                    res = run_worker(s, path, args, steps)
                    results[s].append(res)
                    waited += res["waited_s"]
                    line.append((
                        f"{s} {median(res['flops_per_s']) / 1e9:.0f} GFLOP/s" if s == "matmul"
                        else f"{s} "
                        f"{median([m / l for m, l in zip(res['step_s'], res['lora_step_s'])]):.3f}x"
                        if s in PAIRED else f"{s} {median(res['step_s']):.3f}s"
                    ) + f" (others {res['others_share']:.0%}, steal {res['steal_share']:.0%})")
                print(f"[{name} round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.2f}] "
                      + ", ".join(line), flush=True)
            all_figures[name] = report(name, path, results, args)
            raw[name] = results
        load_after = os.getloadavg()
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": raw,
                                                   "figures": all_figures}))
        print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
              f"(1-minute; {os.cpu_count()} CPUs, other jobs may share them); "
              f"wall time {time.perf_counter() - started:.0f} s, of which "
              f"{waited:.0f} s waiting for an idle machine")


if __name__ == "__main__":
    main()
