"""model.py against transformers' LlamaForCausalLM (the parity oracle) and against itself (cache,
kernels, shards)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from tokenizer import Tokenizer, load_tokenizer
from tests.conftest import TINY_CONFIGS, hf_tiny_model

REPO = M.REPO_DIR


def random_ids(vocab, B=2, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# ----------------------------------------------------------------------------------- parity with HF

@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_logits_match_transformers_llama_fp32(tiny_checkpoint, kind):
    path, hf = tiny_checkpoint(kind)
    ours = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    # past original_max_position_embeddings=64: scaled band in use
    T = 200 if kind == "llama31_rope" else 40
    idx = random_ids(hf.config.vocab_size, T=T)
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5, f"{kind}: max |logit diff| {diff:.2e}"


def test_llama31_rope_scaling_changes_frequencies_as_hf_does():
    """Our inverse frequencies equal transformers' llama3 rope init, and differ from unscaled
    RoPE."""
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # the published Llama 3.1 config.json uses top-level rope_theta + rope_scaling
    cfg = M.LlamaConfig.from_dict(dict(hidden_size=4096, num_attention_heads=32,
                                       num_key_value_heads=8, rope_theta=500000.0,
                                       rope_scaling=scaling, max_position_embeddings=131072))
    hf_cfg = HFConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072,
                      rope_parameters=dict(scaling, rope_theta=500000.0))
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = M.rope_inv_freq(cfg)
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=0)
    plain = M.rope_inv_freq(M.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                          rope_theta=500000.0))
    assert not torch.allclose(ours, plain)


# --------------------------------------------------------------------------------- self-consistency

def test_sharded_loading_equals_single_file(tiny_checkpoint, tmp_path):
    path, hf = tiny_checkpoint("mha_untied")
    sd = load_file(str(path / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((path / "config.json").read_text())
    a = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    b = M.load_pretrained(sharded, dtype=torch.float32, device="cpu")
    idx = random_ids(128)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


def test_loading_converts_to_requested_dtype_and_freezes(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    m = M.load_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight          # tie survives loading


def test_math_attention_equals_sdpa(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    m = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    idx = random_ids(128)
    with torch.no_grad():
        sdpa = m(idx)
        m.set_attention("math")
        math_ = m(idx)
    assert (sdpa - math_).abs().max().item() <= 1e-5


def test_kv_cache_generation_equals_no_cache(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama31_rope")
    m = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    prompt = random_ids(128, B=1, T=7)[0].tolist()
    greedy_cached = M.generate(m, prompt, 30, use_cache=True)
    greedy_plain = M.generate(m, prompt, 30, use_cache=False)
    assert greedy_cached == greedy_plain and len(greedy_cached) == 30
    sampled_cached = M.generate(m, prompt, 20, temperature=0.8, top_p=0.9, seed=3, use_cache=True)
    sampled_plain = M.generate(m, prompt, 20, temperature=0.8, top_p=0.9, seed=3, use_cache=False)
    assert sampled_cached == sampled_plain


def test_kv_cache_chunked_prefill_equals_full_forward(tiny_checkpoint):
    """A prefix, then a multi-token chunk through the cache (the masked SDPA branch) gives the
    full-pass logits."""
    path, _ = tiny_checkpoint("gqa_tied")
    m = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    idx = random_ids(128, B=1, T=20)
    cache = M.KVCache(m.config, 1, 20, "cpu", torch.float32)
    with torch.no_grad():
        full = m(idx)
        first = m(idx[:, :12], cache=cache)
        second = m(idx[:, 12:], cache=cache)
    assert (torch.cat([first, second], 1) - full).abs().max().item() <= 1e-5


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}             # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are outside the nucleus


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    idx = random_ids(128)
    labels = torch.roll(idx, -1, dims=1)
    labels[:, :5] = -100
    grads = []
    for ckpt in (False, True):
        m = M.load_pretrained(path, dtype=torch.float32, device="cpu").train()
        for p in m.parameters():
            p.requires_grad_(True)
        m.grad_checkpoint = ckpt
        m(idx, labels=labels).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_loss_on_labelled_positions_equals_full_logits_cross_entropy(tiny_checkpoint):
    path, _ = tiny_checkpoint("mha_untied")
    m = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    idx = random_ids(128)
    labels = torch.roll(idx, -1, dims=1)
    labels[0, :10] = -100
    labels[:, -1] = -100
    with torch.no_grad():
        ours = m(idx, labels=labels)
        ref = torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), labels.flatten(),
                                                ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_save_pretrained_roundtrip_loads_in_transformers(tiny_checkpoint, tmp_path):
    from transformers import LlamaForCausalLM
    path, hf = tiny_checkpoint("gqa_tied")
    m = M.load_pretrained(path, dtype=torch.float32, device="cpu")
    out = tmp_path / "resaved"
    M.save_pretrained(m.state_dict(), m.config, out)
    hf2 = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = random_ids(128)
    with torch.no_grad():
        assert (hf2(idx).logits - m(idx)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------- bad input

def test_missing_config_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    (path / "config.json").unlink()
    with pytest.raises(M.CheckpointError, match="config.json not found"):
        M.load_pretrained(path, device="cpu")


def test_truncated_safetensors_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(M.CheckpointError, match="truncated or corrupt"):
        M.load_pretrained(path, device="cpu")


def test_corrupt_safetensors_header_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"x" * 32                                  # garble the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(M.CheckpointError, match="model.safetensors"):
        M.load_pretrained(path, device="cpu")


def test_misshaped_tensor_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint("mha_untied")
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(M.CheckpointError,
                       match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(95, 64\)"):
        M.load_pretrained(path, device="cpu")


def test_missing_and_unexpected_tensors_are_listed(tiny_checkpoint):
    path, _ = tiny_checkpoint("mha_untied")
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(M.CheckpointError) as e:
        M.load_pretrained(path, device="cpu")
    assert "missing 1 tensors (e.g. model.norm.weight)" in str(e.value)
    assert "unexpected 1 tensors (e.g. model.extra.weight)" in str(e.value)


def test_tokenizer_larger_than_embedding_is_an_error(smollm2_dir, tmp_path):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2_dir / name).read_bytes())
    with pytest.raises(M.CheckpointError,
                       match="tokenizer has 49152 tokens but the model's embedding has 1000 rows"):
        load_tokenizer(tmp_path, vocab_rows=1000)


def test_unknown_checkpoint_name_says_where_to_download():
    with pytest.raises(M.CheckpointError, match="meta-llama/Llama-2-7b-hf"):
        M.resolve_checkpoint("llama-7b") if not (M.CHECKPOINTS_DIR / "llama-7b").exists() else \
            pytest.skip("a real llama-7b checkpoint is present")


def test_cli_bad_checkpoint_exits_nonzero_with_one_line(tiny_checkpoint):
    path, _ = tiny_checkpoint("gqa_tied")
    (path / "config.json").unlink()
    r = subprocess.run([sys.executable, str(REPO / "model.py"), "--model", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0]


def _write_bos_tokenizer(folder, add_bos_token=None):
    """A small word-level tokenizer whose post-processor adds <s> (as Llama 3's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "1", "2"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(True)])
    tk.add_special_tokens(["<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>"}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_exactly_one_bos_with_a_post_processor_that_adds_bos(tmp_path):
    from transformers import PreTrainedTokenizerFast
    folder = _write_bos_tokenizer(tmp_path / "tok")
    tok = Tokenizer(folder)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in ["hello world", "the cat sat 12", "<s> hello"]:
        ids = tok.encode(text, bos=True)
        assert ids.count(1) == 1 and ids[0] == 1, (text, ids)
        assert tok.encode(text, bos=False).count(1) == text.count("<s>")
    # HF adds BOS via the template
    assert tok.encode("the cat sat 12", bos=True) == hf.encode("the cat sat 12")
    assert tok.encode("hello", bos=True, eos=True) == [1, 3, 2]


def test_add_bos_token_false_means_no_bos(tmp_path):
    tok = Tokenizer(_write_bos_tokenizer(tmp_path / "tok", add_bos_token=False))
    assert tok.bos_id is None and tok.encode("hello", bos=True) == [3]
