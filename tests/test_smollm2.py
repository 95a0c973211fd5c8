"""The embedded default model: GGUF conversion, tokenizer and logits against transformers'
independent GGUF loader."""
import pytest
import torch

import model as M
from convert_gguf import DEFAULT_MODEL_DIR, ensure_default_model, find_default_gguf, gguf_config

pytestmark = pytest.mark.smollm2

STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1984, 12345 people paid $3.50 each (0.5%).",
    "naïve café — 東京 🚀 Ünïcödé",
    "  leading spaces,\ttabs\nand newlines\n\n  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    """transformers converts the GGUF tokenizer with its own code: an independent oracle for
    ours."""
    from transformers import AutoTokenizer
    g = find_default_gguf()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def test_config_read_from_gguf_matches_smollm2_preset(smollm2):
    model, _ = smollm2
    want = M.preset_config("smollm2-135m")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps",
                "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(want, key), key


def test_gguf_config_is_what_llamaconfig_writes():
    """convert_gguf.py writes config.json from a plain dict (it does not import model.py): the
    dict must be what LlamaConfig.to_hf_dict() writes, keys in order, and read back as the
    preset."""
    import gguf
    config = gguf_config(gguf.GGUFReader(str(find_default_gguf())))
    cfg = M.LlamaConfig.from_dict(config)
    assert list(cfg.to_hf_dict().items()) == list(config.items())
    assert cfg == M.preset_config("smollm2-135m")


def test_tokenizer_ids_equal_transformers(smollm2, hf_gguf_tokenizer):
    _, tok = smollm2
    for s in STRINGS:
        assert tok.encode(s) == hf_gguf_tokenizer.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s), skip_special=False) == s


def test_smollm2_uses_no_bos_and_chatml_eos(smollm2):
    _, tok = smollm2
    # SmolLM2 was trained without a BOS: asking for one adds nothing
    assert tok.bos_id is None
    assert tok.encode("hi", bos=True) == tok.encode("hi")
    assert tok.eos_id == tok.tk.token_to_id("<|im_end|>")
    assert tok.encode("hi", eos=True)[-1] == tok.eos_id


def test_chat_prompt_equals_the_checkpoint_chat_template(smollm2, hf_gguf_tokenizer):
    _, tok = smollm2
    ref = hf_gguf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                tokenize=False, add_generation_prompt=True)
    assert tok.chat_prompt("Hi there") == ref


def test_logits_equal_transformers_gguf_loader(smollm2):
    """transformers dequantizes the GGUF and undoes the Q/K permutation itself: our converted
    weights must agree."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    model, tok = smollm2
    g = find_default_gguf()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        ours = model(ids)
        hf_same_file = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR,
                                                        dtype=torch.float32).eval()
        d_same = (hf_same_file(ids).logits - ours).abs().max().item()
        del hf_same_file
        hf_gguf = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                       dtype=torch.float32).eval()
        d_gguf = (hf_gguf(ids).logits - ours).abs().max().item()
    assert d_same <= 1e-4, f"vs transformers on our safetensors: {d_same:.2e}"
    assert d_gguf <= 1e-4, f"vs transformers' own GGUF conversion: {d_gguf:.2e}"


def test_greedy_answer_names_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"), bos=True)
    answer = tok.decode(M.generate(model, ids, 16, eos_id=tok.eos_id))
    assert "Paris" in answer, answer


def test_conversion_is_idempotent(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_conversion_that_fails_part_way_leaves_nothing_behind(tmp_path, monkeypatch):
    """A conversion stopped after the weights are written (a full disk, Ctrl-C) removes its own
    temporary folder, so a retry starts clean; a folder the user had there is left alone. (One
    small tensor stands for the weights, and the GGUF is read once: the cleanup is tested here,
    not the conversion.)"""
    import errno

    import gguf

    import convert_gguf as CG
    reader = gguf.GGUFReader(str(find_default_gguf()))
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: reader)
    parent = tmp_path / "checkpoints"
    (parent / "mine").mkdir(parents=True)
    (parent / "mine" / "notes.txt").write_text("keep me")
    monkeypatch.setattr(CG, "gguf_to_hf_tensors", lambda reader, config: {"w": torch.ones(4)})

    def disk_full(reader):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(CG, "gguf_tokenizer_files", disk_full)
    out = parent / "smollm2-135m"
    with pytest.raises(OSError):
        CG.convert_gguf(find_default_gguf(), out)
    assert sorted(p.name for p in parent.iterdir()) == ["mine"]
    monkeypatch.setattr(CG, "gguf_tokenizer_files", lambda reader: {"tokenizer.json": "{}"})
    assert CG.convert_gguf(find_default_gguf(), out) == out                   # the retry
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.txt", "config.json",
                                                     "model.safetensors", "tokenizer.json"]

    def interrupted(reader):
        raise KeyboardInterrupt
    monkeypatch.setattr(CG, "gguf_tokenizer_files", interrupted)
    users = parent / "mine"
    with pytest.raises(KeyboardInterrupt):
        CG.convert_gguf(find_default_gguf(), users)                 # out_dir is a user's folder
    assert sorted(p.name for p in parent.iterdir()) == ["mine", "smollm2-135m"]
    assert [p.name for p in users.iterdir()] == ["notes.txt"]
    assert (users / "notes.txt").read_text() == "keep me"


def test_a_truncated_gguf_is_a_checkpoint_error_naming_it(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(find_default_gguf(), "rb") as f:
        cut.write_bytes(f.read(2_000_000))                  # the header, part of the vocabulary
    from convert_gguf import convert_gguf
    with pytest.raises(M.CheckpointError, match=r"cut.gguf: not a readable GGUF file \(.*\): "
                                                r"truncated or corrupt"):
        convert_gguf(cut, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["cut.gguf"]
