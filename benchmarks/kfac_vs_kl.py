"""
How well does the K-FAC predicted KL, ½ Σ_ℓ tr(Γ_ℓ δW_ℓ S_ℓ δW_ℓᵀ), match the KL a weight change really causes?

    python benchmarks/kfac_vs_kl.py

Builds the tiny Llama of tests/test_ctr.py (2 layers, d = 64, SmolLM2 tokenizer), fully fine-tunes it for 60 steps on
the WordNet task (as the stability test does), collects full K-FAC factors of q_proj, v_proj and down_proj on one
batch of 16 examples (empirical and sampled-label Fisher), then perturbs those weights by random δW of growing size
and prints predicted vs measured mean KL(p_before ‖ p_after) per target token. Measured ratios are quoted in
notes/ctr_lora.md. Not a test: prints figures (about 10 s on 2 cores).
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import curvature as C  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from convert_gguf import ensure_default_model  # noqa: E402
from tests.conftest import write_hf_tiny_with_tokenizer  # noqa: E402


def main():
    out = Path(tempfile.mkdtemp())
    write_hf_tiny_with_tokenizer(out / "m", 3, ensure_default_model())     # the model of tests/test_ctr.py
    T.train(T.TrainConfig(model=str(out / "m"), val_data="", out=str(out / "base"), method="full", lr=3e-3, steps=60,
                          batch_size=8, warmup_steps=5, log_every=60, eval_every=0, save_every=0))
    net, tok = M.load_model_and_tokenizer(out / "base", torch.float32, "cpu")
    examples = D.encode_dataset(D.load_jsonl(M.REPO_DIR / "data" / "wordnet_train.jsonl")[:200], tok, 64)
    batch = next(D.Batcher(examples, 16, tok.pad_id, seed=0))
    ids, labels = batch["input_ids"], batch["labels"]
    mask = labels != -100
    mods = {n: m for n, m in net.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    with torch.no_grad():
        logp0 = net(ids)[mask].log_softmax(-1)
    print(f"{'Fisher':10s} {'|δW| entry std':>15s} {'predicted KL':>13s} {'measured KL':>12s} {'ratio':>7s}")
    for kind in ("empirical", "sampled"):
        factors = C.collect_fisher(net, mods, [(ids, labels)], kind=kind, stats=("full",),
                                   generator=torch.Generator().manual_seed(0))
        for scale in (1e-3, 1e-2, 1e-1):
            g = torch.Generator().manual_seed(0)
            predicted, saved = 0.0, {}
            for name, m in mods.items():
                dW = scale * torch.randn(m.weight.shape, generator=g)
                predicted += 0.5 * C.metric_norm_sq(dW, factors[name].S, factors[name].Gamma).item()
                saved[name] = m.weight.data.clone()
                m.weight.data += dW
            with torch.no_grad():
                logp1 = net(ids)[mask].log_softmax(-1)
            measured = (logp0.exp() * (logp0 - logp1)).sum(-1).mean().item()
            for name, m in mods.items():
                m.weight.data = saved[name]
            print(f"{kind:10s} {scale:15.0e} {predicted:13.3e} {measured:12.3e} {measured / predicted:7.1f}")


if __name__ == "__main__":
    main()
