"""Shared fixtures: tiny random HF checkpoints written on the fly, and the embedded SmolLM2
checkpoint."""
import json
import os

import pytest
import torch

import model as M
from convert_gguf import ensure_default_model
from tokenizer import load_tokenizer

# tests never reach a hub: every checkpoint is written locally
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Three tiny shapes that exercise each architectural switch the parity tests care about.
TINY_CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                     rope_theta=100000.0),
    "llama31_rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=512,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}),
}


def hf_tiny_model(kind: str, seed: int = 0, **overrides):
    """A transformers LlamaForCausalLM with random (non-trivial) weights, fp32."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=None)
    kw.update(TINY_CONFIGS[kind])
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(HFConfig(**kw)).float().eval()
    # RMSNorm weights start at 1: perturb so a mix-up would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread per module of tests (restored afterwards) avoids spin-waiting
    and oversubscription on a shared machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: write a tiny HF checkpoint to a temp folder, return (folder, hf_model)."""
    def make(kind="gqa_tied", **overrides):
        hf = hf_tiny_model(kind, **overrides)
        out = tmp_path / kind
        hf.save_pretrained(out, safe_serialization=True)
        return out, hf
    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """checkpoints/smollm2-135m, converted from the embedded GGUF on first use."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    model = M.load_pretrained(smollm2_dir, dtype=torch.float32, device="cpu")
    return model, load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random model.py Llama (2 layers, d=64, PyTorch default init) that uses SmolLM2's real
    tokenizer: milliseconds per training step, real data."""
    cfg = M.LlamaConfig(**dict(M.PRESETS["tiny"], vocab_size=49152, tie_word_embeddings=True,
                               bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    M.save_pretrained(M.Llama(cfg).state_dict(), cfg, out, tokenizer_dir=smollm2_dir)
    return out


def write_hf_tiny_with_tokenizer(out, seed: int, tokenizer_dir):
    """transformers' tiny GQA Llama with HF initialization (std 0.02: loss starts near ln(vocab)),
    SmolLM2 vocab and tokenizer, saved as a checkpoint folder. Returns the folder."""
    hf_tiny_model("gqa_tied", vocab_size=49152, seed=seed).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


# --- a tiny transformers Llama for the adapter tests (test_adapters, test_adalora, test_triadapt) -

def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random transformers LlamaForCausalLM. initializer_range 0.1 (not 0.02) so logits are
    O(1) and differences are visible."""
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(123))


@torch.no_grad()
def logits(model, idx):
    return model(idx).logits.float()
