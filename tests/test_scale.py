"""Big models on small machines: bf16 weight storage with fp32 compute (model.call_in_dtype), and
synthetic HF checkpoints of any preset's shape (synthetic_checkpoint.write_synthetic_checkpoint).

The oracle for bf16 storage + fp32 compute is an ordinary fp32 model whose weights are the same
bf16-rounded values: the two must give the same logits and the same adapter gradients. The oracle
for the synthetic writer is the safetensors library, transformers' LlamaForCausalLM /
AutoTokenizer, and the preset it was asked for.
"""
import copy
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import adapters as A
import curvature as C
import model as M
import synthetic_checkpoint as S
from tokenizer import load_tokenizer

REPO = M.REPO_DIR
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------- bf16 storage, fp32 compute

def tiny_pair(tie: bool = False, seed: int = 0):
    """(bf16-storage model computing in fp32, fp32 model of the same bf16-rounded weights), both
    random."""
    cfg = M.LlamaConfig(**dict(M.PRESETS["tiny"], tie_word_embeddings=tie))
    torch.manual_seed(seed)
    ref = M.Llama(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                # norms away from 1, so a skipped cast would show
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.bfloat16().float())    # the values a bf16 checkpoint can hold
    net = copy.deepcopy(ref).to(torch.bfloat16)
    net.inv_freq = ref.inv_freq.clone()      # buffers stay fp32, as load_pretrained builds them
    net.compute_dtype = torch.float32
    return net, ref


def batch(vocab=256, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    labels = idx.roll(-1, dims=1)
    labels[:, :3] = -100                                       # a prompt without loss
    labels[:, -1] = -100
    return idx, labels


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_storage_fp32_compute_logits_equal_fp32_model_of_rounded_weights(tie):
    net, ref = tiny_pair(tie)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    idx, labels = batch()
    with torch.no_grad():
        got, want = net(idx), ref(idx)
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-5
        assert abs(net(idx, labels=labels).item() - ref(idx, labels=labels).item()) <= 1e-5
        # plain bf16 arithmetic: visibly different, so the comparison above can fail
        net.compute_dtype = None
        plain = net(idx).float()
    assert (plain - want).abs().max().item() > 1e-3


def adapted_pair(method: str, ckpt: bool):
    net, ref = tiny_pair()
    cfg = A.AdapterConfig(method=method, r=4, targets=ALL_LINEARS, total_steps=10)
    for m in (net, ref):
        torch.manual_seed(0)
        A.apply_method(m, method, cfg)
        # LoRA's B starts at 0: make every factor non-zero
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for p in A.adapter_named_parameters(m).values():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        m.grad_checkpoint = ckpt
        m.train()
    return net, ref, cfg


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-checkpointing", "grad-checkpoint"])
@pytest.mark.parametrize("method", ["lora", "triadapt", "ctr"])
def test_adapter_gradients_equal_fp32_model_of_rounded_weights(method, ckpt):
    net, ref, _ = adapted_pair(method, ckpt)
    idx, labels = batch()
    for m in (net, ref):
        m(idx, labels=labels).backward()
    got, want = A.adapter_named_parameters(net), A.adapter_named_parameters(ref)
    assert list(got) == list(want) and got
    for name, p in got.items():
        # adapters stay fp32 and trainable
        assert p.dtype == torch.float32 and p.requires_grad, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        scale = want[name].grad.abs().max().item()
        assert (p.grad - want[name].grad).abs().max().item() <= 1e-5 * max(1.0, scale), name
    assert any(p.grad.abs().max() > 0 for p in got.values())
    for name, p in net.named_parameters():
        # the frozen bf16 base: no gradient, no dtype change
        if name not in got:
            assert p.dtype == torch.bfloat16 and not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-checkpointing", "grad-checkpoint"])
def test_curvature_forward_hooks_see_the_fp32_computation(ckpt):
    """K-FAC collectors hook the adapted modules; with bf16 storage they must collect what the fp32
    model does."""
    net, ref, _ = adapted_pair("lora", ckpt)
    idx, labels = batch()
    factors, calls = [], []
    for m in (net, ref):
        layers = {"q0": m.model.layers[0].self_attn.q_proj,
                  "down1": m.model.layers[1].mlp.down_proj}
        n = {"calls": 0}
        counter = layers["q0"].register_forward_hook(
            lambda *a: n.__setitem__("calls", n["calls"] + 1))
        with C.KFACCollector(layers, ("diag", "projected")) as kfac:
            kfac.set_batch(labels != -100)
            m(idx, labels=labels).backward()
        counter.remove()
        factors.append(kfac.factors())
        calls.append(n["calls"])
    # checkpointing re-runs the hooks in backward
    assert calls[0] == calls[1] == (2 if ckpt else 1)
    for name, f in factors[0].items():
        for key, t in f.tensors().items():
            want = factors[1][name].tensors()[key]
            assert t.dtype == torch.float32
            assert ((t - want).abs().max().item()
                    <= 1e-5 * max(1.0, want.abs().max().item())), (name, key)


def test_generation_with_bf16_storage_equals_fp32_model_of_rounded_weights():
    net, ref = tiny_pair(seed=3)
    prompt = [1, 17, 42, 99, 5]
    assert M.generate(net, prompt, max_new_tokens=12) == M.generate(ref, prompt, max_new_tokens=12)


def test_weights_dtype_policy():
    assert M.weights_dtype_policy("bfloat16", "cpu") == (torch.bfloat16, torch.float32)
    assert M.weights_dtype_policy("float32", "cpu") == (torch.float32, None)
    assert M.weights_dtype_policy("auto", "cpu") == (torch.float32, None)
    with pytest.raises(ValueError, match="weights dtype"):
        M.weights_dtype_policy("int8", "cpu")


# ---------------------------------------------------------------------------- synthetic checkpoints

@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_synthetic_checkpoint_of_a_preset_loads_with_that_presets_config(tmp_path, preset):
    out = S.write_synthetic_checkpoint(tmp_path / preset, preset, dtype=torch.bfloat16,
                                       shard_bytes=100_000_000)
    net = M.load_pretrained(out, dtype=torch.bfloat16, device="cpu", compute_dtype=torch.float32)
    assert net.config == M.preset_config(preset)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    if net.config.tie_word_embeddings:                         # stored once, as HF does
        stored = (json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
                  if (out / "model.safetensors.index.json").is_file()
                  else load_file(str(out / "model.safetensors")))
        assert ("lm_head.weight" not in stored
                and net.lm_head.weight is net.model.embed_tokens.weight)
    tok = load_tokenizer(out, vocab_rows=net.config.vocab_size)
    ids = tok.encode("Hello, naïve 東京 🚀", bos=True, eos=True)
    with torch.no_grad():
        logits = net(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), net.config.vocab_size) and torch.isfinite(logits).all()


def test_synthetic_checkpoint_is_read_by_transformers_and_safetensors(tmp_path):
    """transformers loads the folder (config, shards, index, tokenizer) and agrees with model.py
    token for token."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    out = S.write_synthetic_checkpoint(tmp_path / "tiny", "tiny", dtype=torch.float32,
                                       shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = {}
    for f in shards:                                       # the library reads our streamed files
        tensors.update(load_file(str(out / f)))
        assert (out / f).stat().st_size <= 60_000 + 4096 or len(load_file(str(out / f))) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    assert (set(tensors) == set(index["weight_map"])
            == set(S.checkpoint_shapes(M.preset_config("tiny"))))
    for name, t in tensors.items():
        assert torch.equal(t, S.synthetic_tensor(name, tuple(t.shape), torch.float32, seed=0)), name
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = M.load_pretrained(out, dtype=torch.float32, device="cpu")
    tok, hf_tok = load_tokenizer(out), AutoTokenizer.from_pretrained(str(out))
    text = "The café serves 3 naïve 🚀 rockets.\n\tEnd"
    ids = tok.encode(text, bos=True)
    assert ids == hf_tok(text).input_ids and ids[0] == 1 and tok.eos_id == 2
    assert tok.decode(ids) == text                         # byte-level: any str round-trips
    with torch.no_grad():
        assert ((ours(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
                <= 1e-5)


def test_synthetic_weights_depend_on_seed_and_name_only(tmp_path):
    one = S.write_synthetic_checkpoint(tmp_path / "one", "tiny", shard_bytes=10**9)
    many = S.write_synthetic_checkpoint(tmp_path / "many", "tiny", shard_bytes=50_000)
    other = S.write_synthetic_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert ((one / "model.safetensors").is_file()
            and not (one / "model.safetensors.index.json").exists())
    sd = {k: v for k, v in M.load_pretrained(one, torch.bfloat16, "cpu").state_dict().items()}
    for k, v in M.load_pretrained(many, torch.bfloat16, "cpu").state_dict().items():
        assert torch.equal(v, sd[k]), k
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(M.load_pretrained(other, torch.bfloat16, "cpu").state_dict()[q], sd[q])
    assert abs(sd[q].float().std().item() - S.SYNTHETIC_INIT_STD) < 0.002


def test_synthetic_writer_never_leaves_a_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    real = S.synthetic_tensor
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(S, "synthetic_tensor", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        S.write_synthetic_checkpoint(out, "tiny", shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []               # neither the folder nor its temporary twin
    monkeypatch.setattr(S, "synthetic_tensor", real)
    S.write_synthetic_checkpoint(out, "tiny")
    with pytest.raises(M.CheckpointError, match="already exists"):
        S.write_synthetic_checkpoint(out, "tiny")
    S.write_synthetic_checkpoint(out, "tiny", seed=4, overwrite=True)
    assert "seed 4" in (out / "SYNTHETIC.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.smollm2
def test_synthetic_checkpoint_copies_a_real_tokenizer_only_if_it_fits(tmp_path, smollm2_dir):
    with pytest.raises(ValueError, match="vocab_size is 256"):
        S.write_synthetic_checkpoint(tmp_path / "tiny", "tiny", tokenizer_from=smollm2_dir)
    assert not (tmp_path / "tiny").exists()
    out = S.write_synthetic_checkpoint(tmp_path / "s", "smollm2-135m", num_layers=1,
                                       tokenizer_from=smollm2_dir)
    assert (out / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
    net, tok = M.load_model_and_tokenizer(out, torch.bfloat16, "cpu", compute_dtype=torch.float32)
    assert "<|im_start|>" in tok.chat_prompt("hi") and net.config.num_hidden_layers == 1


def test_13b_shaped_two_layer_sharded_checkpoint_writes_loads_and_runs(tmp_path):
    """Llama 2 13B's shape (d=5120, 32000 tokens) with 2 of its 40 layers: 962M parameters, 1.92 GB
    of bf16 on disk in 4 shards of <= 600 MB (deleted at the end). Loads with bf16 storage and fp32
    compute; a forward is finite."""
    cfg = M.preset_config("llama2-13b")
    out = tmp_path / "llama2-13b-2layers"
    t0 = time.perf_counter()
    S.write_synthetic_checkpoint(out, "llama2-13b", num_layers=2, shard_bytes=600_000_000)
    try:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) == 4 and all((out / f).is_file() for f in files)
        shapes = S.checkpoint_shapes(M.LlamaConfig(**dict(M.PRESETS["llama2-13b"],
                                                          num_hidden_layers=2)))
        assert set(index["weight_map"]) == set(shapes)
        n_params = sum(torch.Size(s).numel() for s in shapes.values())
        assert n_params == 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size + 2 * (
            4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size
            + 2 * cfg.hidden_size)
        assert index["metadata"]["total_size"] == 2 * n_params     # bf16
        data_bytes = sum((out / f).stat().st_size for f in files)
        # the rest is 4 small headers
        assert 0 < data_bytes - index["metadata"]["total_size"] < 4 * 8192
        net, tok = M.load_model_and_tokenizer(out, torch.bfloat16, "cpu",
                                              compute_dtype=torch.float32)
        assert net.config == M.LlamaConfig(**dict(M.PRESETS["llama2-13b"], num_hidden_layers=2))
        assert sum(p.numel() for p in net.parameters()) == n_params
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
        ids = tok.encode("A few tokens.", bos=True)[:6]
        with torch.no_grad():
            logits = net(torch.tensor([ids]))
        assert logits.shape == (1, len(ids), 32000) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all() and logits.std() > 0.1
    finally:
        # 1.9 GB: do not leave it in pytest's tmp folders
        shutil.rmtree(out, ignore_errors=True)
    print(f"13B-shaped 2-layer checkpoint: written, loaded and run in "
          f"{time.perf_counter() - t0:.1f}s")


def test_make_synthetic_checkpoint_cli(tmp_path, capsys):
    """The script's --help, a run with every option, and a clean one-line error (exit 1) for an
    existing folder."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint",
                                                  REPO / "scripts" / "make_synthetic_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--shard-size" in capsys.readouterr().out
    assert script.parse_size("2GB") == 2 * 10**9 and script.parse_size("512MiB") == 512 * 2**20
    out = tmp_path / "t"
    M.cli(script.main, ["tiny", str(out), "--layers", "1", "--dtype", "float32",
                        "--shard-size", "50KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert M.LlamaConfig.from_json(out / "config.json").num_hidden_layers == 1
    assert (load_file(str(out / sorted(set(index["weight_map"].values()))[0])).popitem()[1].dtype
            == torch.float32)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        M.cli(script.main, ["tiny", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "already exists" in err and "Traceback" not in err
