"""memory.py: the estimate is derived from shapes; these tests hold it against what PyTorch actually
does.

1. The symbolic forward (memory.forward_memory) counts, byte for byte, the tensors autograd saves
   for backward (torch.autograd.graph.saved_tensors_hooks on real tiny models) for every method
   and dtype mode.
2. The estimated total is within 15% of the measured peak resident memory of real training steps
   on CPU (a ~16M-parameter model, LoRA and full fine-tuning, with and without gradient
   checkpointing).
3. The dry-run report of a preset (llama-7b) needs no weights: only config.json is ever read, and
   the weight bytes are the exact parameter count × 2 for bf16.
"""
import builtins
import io
import itertools
import os
from contextlib import nullcontext

import pytest
import torch

import adapters as A
import memory
import model as M

# --------------------------------------------------------------------------------------------------
# 1. saved tensors: symbolic count == autograd's
# --------------------------------------------------------------------------------------------------

MODES = {   # name: (storage dtype, autocast bf16, model.compute_dtype)
    "fp32": (torch.float32, False, None),
    "autocast, bf16 weights": (torch.bfloat16, True, None),
    "autocast, fp32 weights": (torch.float32, True, None),
    "bf16 weights, fp32 compute": (torch.bfloat16, False, torch.float32),
    "bf16": (torch.bfloat16, False, None),
}
HAS_COMPUTE_DTYPE = hasattr(M, "call_in_dtype")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def measured_saved_bytes(cfg, method, acfg, mode, B=2, T=16, labelled_from=4):
    """Bytes of the distinct storages autograd saves in one forward with labels (parameters,
    buffers and TriAdaptLoRA's cached core index excluded: they exist anyway)."""
    storage, autocast, compute = MODES[mode]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if method == "full" else storage)
    try:
        net = M.Llama(cfg)
    finally:
        torch.set_default_dtype(default)
    net.inv_freq = M.rope_inv_freq(cfg)
    if compute is not None:
        net.compute_dtype = compute
    if method == "full":
        for p in net.parameters():
            p.requires_grad_(True)
    else:
        A.apply_method(net, method, acfg)
        for layer in A.adapter_layers(net).values():
            if isinstance(layer, A.TriAdaptLinear):
                layer.grow_to(memory.triadapt_final_rank(acfg))
    net.train()
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    labels = idx.clone()
    labels[:, :labelled_from] = -100                       # a prompt: the head sees N < B·T rows
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    if method == "triadapt":
        with torch.no_grad(), amp:
            net(idx, labels=labels)                        # builds TriAdaptLoRA's index caches
    persistent = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    persistent |= {m._index.untyped_storage().data_ptr() for m in A.adapter_layers(net).values()
                   if getattr(m, "_index", None) is not None}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in persistent:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        net(idx, labels=labels)
    return sum(seen.values()), int((labels != -100).sum())


def symbolic_saved_bytes(cfg, method, acfg, mode, N, B=2, T=16):
    storage, autocast, compute = MODES[mode]
    full = method == "full"
    ws = 4 if full else memory.BYTES[storage]
    per_block = memory.adapters_per_block(cfg, method, acfg)
    fm = memory.forward_memory(cfg, per_block, B, T, N, autocast=autocast, weight_size=ws,
                               weight_copy=compute == torch.float32 and ws == 2, full=full,
                               # CPU dropout
                               dropout_mask=4 if acfg is not None and acfg.dropout > 0 else 0)
    return fm.embed + sum(fm.blocks) + fm.head + fm.head_copies + fm.logprobs


def tiny_cfg(n_kv=2, tied=False):
    return M.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=n_kv,
                         max_position_embeddings=64, tie_word_embeddings=tied)


CASES = [(m, mode, "all", 0.0, 2, False) for m, mode in itertools.product(
            ["lora", "adalora", "triadapt", "ctr", "cg", "cg-shift", "full"], MODES)]
CASES += [(m, "fp32", t, p, kv, tied) for m, t, p, kv, tied in [
    ("lora", "q_proj,v_proj", 0.0, 2, False), ("adalora", "o_proj,down_proj", 0.0, 4, False),
    ("triadapt", "k_proj,gate_proj", 0.0, 1, True), ("lora", "all", 0.1, 2, False),
    ("ctr", "all", 0.1, 4, True), ("full", "all", 0.0, 4, True)]]
CASES += [("lora", "autocast, bf16 weights", "q_proj,v_proj", 0.1, 2, False),
          ("triadapt", "bf16 weights, fp32 compute", "up_proj,down_proj", 0.0, 4, True)]


@pytest.mark.parametrize("method,mode,targets,dropout,n_kv,tied", CASES)
def test_symbolic_forward_counts_exactly_the_tensors_autograd_saves(method, mode, targets, dropout,
                                                                    n_kv, tied):
    if MODES[mode][2] is not None and not HAS_COMPUTE_DTYPE:
        pytest.skip("model.py has no compute_dtype (call_in_dtype) mode")
    cfg = tiny_cfg(n_kv, tied)
    m = "cg" if method == "cg-shift" else method
    acfg = None if m == "full" else A.AdapterConfig(
        method=m, r=4, targets=A.LLAMA_LINEAR_NAMES if targets == "all" else targets,
        dropout=dropout, total_steps=100,
        cg_variant="shift" if method == "cg-shift" else "no-shift")
    measured, N = measured_saved_bytes(cfg, m, acfg, mode)
    assert symbolic_saved_bytes(cfg, m, acfg, mode, N) == measured


@pytest.mark.parametrize("cg_mode", ["dense", "sketch"])
def test_cg_calibration_pass_saves_what_the_estimate_counts(cg_mode):
    """adapters.cg_calibration_factors: eval mode (no checkpointing), no autocast; dense mode needs
    the adapted weights' gradients (their inputs are saved), sketch mode the first norm weight's."""
    cfg = tiny_cfg()
    acfg = A.AdapterConfig(method="cg", r=4, targets=A.LLAMA_LINEAR_NAMES, cg_mode=cg_mode,
                           cg_batches=1)
    torch.manual_seed(0)
    net = M.Llama(cfg)
    for p in net.parameters():
        p.requires_grad_(False)
    A.apply_method(net, "cg", acfg)
    hooks = A.training_hooks(net, acfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    persistent = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hooks.calibrate([(idx, idx.clone())])
    fm = memory.forward_memory(
        cfg, memory.cg_calibration_adapters(memory.adapters_per_block(cfg, "cg", acfg)),
        2, 16, 32, autocast=False, weight_size=4, weight_copy=False, full=False,
        first_norm_trainable=cg_mode == "sketch", dense_weights=cg_mode == "dense")
    assert fm.embed + sum(fm.blocks) + fm.head + fm.head_copies + fm.logprobs == sum(seen.values())


# --------------------------------------------------------------------------------------------------
# 2. the total against the measured peak of real training steps (CPU, peak RSS,
#    benchmarks/memory_validation.py)
# --------------------------------------------------------------------------------------------------

TEST_MODEL = dict(vocab_size=12000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2,
                  max_position_embeddings=512)                              # 15.5M parameters


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="peak RSS reset needs Linux /proc")
def test_estimated_total_is_within_15_percent_of_measured_peak_on_cpu():
    import memory_validation as V                            # benchmarks/ (pytest.ini's pythonpath)
    specs = V.validation_specs(("lora", "full"), batch_size=2, seq_len=128, config=TEST_MODEL)
    measured = V.measure_peaks(specs)
    report = []
    for spec, peak in zip(specs, measured):
        estimated = V.estimate_spec(spec)["bytes"]["total"]
        report.append(f"{spec['method']} ckpt={spec['grad_checkpoint']}: "
                      f"estimated {memory.human(estimated)}, "
                      f"measured {memory.human(peak)} ({(estimated - peak) / peak:+.1%})")
        assert peak > 50 * memory.MiB                        # the run really held its tensors
    for line, spec, peak in zip(report, specs, measured):
        estimated = V.estimate_spec(spec)["bytes"]["total"]
        assert abs(estimated - peak) <= 0.15 * peak, "\n".join(report)


# --------------------------------------------------------------------------------------------------
# 3. the dry run: presets without weights, exact weight bytes
# --------------------------------------------------------------------------------------------------

def llama_param_count(V, d, f, L, n_heads, n_kv, tied=False):
    """Independent count: embedding + L × (q, k, v, o, gate, up, down, 2 norms) + final norm +
    lm_head."""
    hd = d // n_heads
    per_layer = d * d + 2 * d * n_kv * hd + d * d + 3 * d * f + 2 * d
    return V * d + L * per_layer + d + (0 if tied else V * d)


def test_7b_lora_weight_bytes_are_the_exact_parameter_count_times_two_in_bf16():
    n = llama_param_count(32000, 4096, 11008, 32, 32, 32)
    assert n == 6_738_415_616                                     # Llama-2-7B's published count
    assert llama_param_count(128256, 4096, 14336, 32, 32, 8) == 8_030_261_248      # Llama-3-8B
    cfg = M.preset_config("llama-7b")
    acfg = A.AdapterConfig(method="lora", r=16, targets=A.LLAMA_LINEAR_NAMES)
    est = memory.estimate(cfg, "lora", acfg, 1, 2048, torch.bfloat16, torch.bfloat16, True)
    assert est["weights"] == 2 * n
    # LoRA r=16 on the 7 linears: r·(d_in + d_out) each, fp32; gradients 4 bytes, AdamW 8 bytes
    # per parameter
    n_lora = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert ((est["adapters"], est["adapter_grads"], est["optimizer"])
            == (4 * n_lora, 4 * n_lora, 8 * n_lora))


@pytest.fixture
def no_weight_files(monkeypatch):
    """Record every file opened; fail on any attempt to read weights."""
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the dry run tried to load weights")

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    import safetensors
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(M, "load_state_into", forbidden)
    monkeypatch.setattr(M, "load_pretrained", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    return opened


def test_dry_run_report_of_a_preset_lists_every_component_without_weights(no_weight_files):
    import train
    cfg = train.TrainConfig(model="llama-7b", method="ctr", batch_size=1, seq_len=2048, rank=16,
                            device="cpu")
    text = memory.dry_run_report(cfg)
    for part in ("preset llama2-7b", "weights", "adapters", "gradients", "optimizer state",
                 "curvature/allocator state", "weight copies", "activations", "logits", "total",
                 "no ckpt", "grad ckpt", "this run: gradient checkpointing off"):
        assert part in text, part
    for method in memory.ALL_METHODS:
        assert f"\n    {method} " in text, method
    assert not [f for f in no_weight_files if f.endswith((".safetensors", ".bin", ".pt", ".gguf"))]
    cfg.weights_dtype = "bfloat16"                         # the flag train.py may add: bf16 storage
    n = memory.model_param_count(M.preset_config("llama2-7b"))
    assert "weights (bfloat16)" in memory.dry_run_report(cfg)
    shape, _ = memory.model_shape("llama-7b")
    device, storage, compute, ckpt = memory.run_dtypes(cfg)
    # train.py forces ckpt
    assert (device, storage, compute, ckpt) == ("cpu", torch.bfloat16, torch.float32, True)
    assert memory.estimate(shape, "ctr", cfg.adapter_config(), 1, 2048, storage, compute,
                           ckpt)["weights"] == 2 * n


def test_dry_run_reads_the_shape_from_a_checkpoint_folders_config_json(tmp_path, no_weight_files):
    import train
    shape = M.LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=200,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(__import__("json").dumps(shape.to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"not a real file: opening it would fail")
    no_weight_files.clear()                                    # count only what the dry run opens
    cfg = train.TrainConfig(model=str(tmp_path), method="lora", batch_size=2, seq_len=64,
                            device="cpu")
    text = memory.dry_run_report(cfg)
    assert str(tmp_path / "config.json") in text
    assert f"{memory.model_param_count(shape) / 1e6:.2f}M parameters" in text
    assert memory.model_param_count(shape) == llama_param_count(1000, 96, 200, 3, 4, 2)
    assert str(tmp_path / "config.json") in no_weight_files
    assert not [f for f in no_weight_files if f.endswith(".safetensors")]
