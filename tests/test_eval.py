"""eval.py metrics against explicit per-example computations."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adapter_io as IO
import adapters as A
import data as D
import eval as E
import model as M


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    cfg = M.LlamaConfig(**dict(M.PRESETS["tiny"], vocab_size=49152, tie_word_embeddings=True))
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny_eval")
    M.save_pretrained(M.Llama(cfg).state_dict(), cfg, out, tokenizer_dir=smollm2_dir)
    return out, *M.load_model_and_tokenizer(out, torch.float32, "cpu")


def seq_logprob(net, ids, mask):
    """Sum of log p(ids[i] | ids[:i]) over positions with mask[i], from full logits, one sequence
    at a time."""
    logits = net(torch.tensor([ids]))[0].log_softmax(-1)           # (T, vocab)
    return sum(logits[i - 1, ids[i]].item() for i in range(1, len(ids)) if mask[i])


def test_choice_accuracy_equals_explicit_scoring(tiny):
    _, net, tok = tiny
    records = [{"question": f"Word: {w}\nCategory:",
                "choices": [" animal", " tool", " colour", " food item"], "answer": i % 4}
               for i, w in enumerate(["dog", "hammer", "red", "bread", "cat", "saw", "blue"])]
    want = want_norm = 0
    with torch.no_grad():
        for r in records:
            cands, answer = D.encode_choices(r, tok, 64)
            scores = [seq_logprob(net, ids, mask) for ids, mask in cands]
            per_tok = [s / sum(m[1:]) for s, (_, m) in zip(scores, cands)]
            want += max(range(4), key=lambda j: scores[j]) == answer
            want_norm += max(range(4), key=lambda j: per_tok[j]) == answer
    got = E.choice_accuracy(net, tok, records, 64, batch_size=3)      # batches cut across records
    assert got["acc"] == want / len(records)
    assert got["acc_per_token"] == want_norm / len(records)


def test_evaluate_loss_is_mean_token_cross_entropy(tiny):
    _, net, tok = tiny
    records = D.load_jsonl(M.REPO_DIR / "data" / "wordnet_val.jsonl")[:10]
    examples = D.encode_dataset(records, tok, 64)
    with torch.no_grad():
        total = sum(-seq_logprob(net, ids, mask) for ids, mask in examples)
    n = sum(sum(mask[1:]) for _, mask in examples)
    got = E.evaluate_loss(net, examples, batch_size=4, pad_id=tok.pad_id)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / n), rel=1e-4)


def test_rank_grid_places_modules_by_layer_and_type():
    grid, layers, kinds = E.rank_grid({"model.layers.2.mlp.up_proj": 3,
                                       "model.layers.0.self_attn.q_proj": 5,
                                       "model.layers.2.self_attn.q_proj": 1})
    assert layers == [0, 2] and kinds == ["q_proj", "up_proj"]
    assert grid == [[5, 0], [1, 3]]


def test_cli_reports_base_and_adapter_side_by_side(tiny, tmp_path):
    path, net, tok = tiny
    torch.manual_seed(0)
    A.apply_method(net, "lora", A.AdapterConfig(r=2, targets=["q_proj", "down_proj"]))
    for layer in A.adapter_layers(net).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    IO.save_adapter(net, A.AdapterConfig(r=2, targets=["q_proj", "down_proj"]),
                    str(tmp_path / "ad"))
    A.remove_adapters(net)
    out = tmp_path / "res.json"
    data = [str(M.REPO_DIR / "data" / f) for f in ("wordnet_val.jsonl", "wordnet_val_choice.jsonl")]
    r = subprocess.run([sys.executable, str(M.REPO_DIR / "eval.py"), "--model", str(path),
                        "--adapter", str(tmp_path / "ad"), "--data", *data,
                        "--max-examples", "12", "--out", str(out),
                        "--rank-heatmap", str(tmp_path / "ranks.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    val, choice = res["wordnet_val.jsonl"], res["wordnet_val_choice.jsonl"]
    assert set(val) == {"base", "adapter"} and val["base"]["loss"] != val["adapter"]["loss"]
    assert 0 <= choice["adapter"]["acc"] <= 1 and choice["base"]["examples"] == 12
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_prediction_kl_equals_explicit_kl_and_is_zero_against_itself(tiny, smollm2_dir, tmp_path):
    path, net, tok = tiny
    other = M.load_pretrained(path, torch.float32, "cpu")
    with torch.no_grad():
        other.model.norm.weight.mul_(0.05)                  # softens the reference's predictions
    examples = D.encode_dataset(D.load_jsonl(M.REPO_DIR / "data" / "wordnet_val.jsonl")[:6],
                                tok, 64)
    assert (E.prediction_kl(net, net, examples, 4, tok.pad_id)["kl_to_reference"]
            == pytest.approx(0.0, abs=1e-6))
    want, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            p = net(torch.tensor([ids]))[0].log_softmax(-1)             # model
            q = other(torch.tensor([ids]))[0].log_softmax(-1)           # reference
            for i in range(1, len(ids)):
                if mask[i]:
                    want += (q[i - 1].exp() * (q[i - 1] - p[i - 1])).sum().item()
                    n += 1
    got = E.prediction_kl(net, other, examples, 4, tok.pad_id)
    assert got["tokens"] == n and got["kl_to_reference"] == pytest.approx(want / n, rel=1e-4)
    assert got["kl_to_reference"] > 1e-4


def test_trust_region_plot_puts_the_measured_kl_against_rho(tmp_path, monkeypatch):
    """The top panel: the measured KL per logged step (`kl`, `kl_max`) against ρ, κ faint behind
    (lowest zorder); a KL of 0 (no step applied) is a gap, rows of other kinds are passed over."""
    rows = [{"step": s, "loss": 2.0, "kappa": 0.03 * s, "kl": 0.002 * s, "kl_max": 0.004 * s,
             "rho": 0.01, "clip_rate": 0.5} for s in (1, 2, 4)]
    rows.insert(2, {"step": 3, "loss": 2.0, "kappa": 0.05, "kl": 0.0, "kl_max": 0.006,
                    "rho": 0.01, "clip_rate": 1.0})
    rows.append({"step": 4, "val_loss": 2.1})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(E, "_save_figure", lambda fig, out: figures.append(fig) or out)
    E.plot_trust_region(metrics, tmp_path / "tr.png")
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    measured = lines["measured KL of the logged step"]
    assert list(measured.get_xdata()) == [1, 2, 3, 4]
    ydata = list(measured.get_ydata())
    assert ydata[:2] + ydata[3:] == [0.002, 0.004, 0.008] and math.isnan(ydata[2])
    assert list(lines["largest measured KL since the last log"].get_ydata()) == [
        0.004, 0.008, 0.006, 0.016]
    assert list(lines["ρ (the bound)"].get_ydata()) == [0.01] * 4
    kappa = next(line for label, line in lines.items() if label.startswith("κ"))
    assert kappa.get_zorder() < min(line.get_zorder() for line in lines.values()
                                    if line is not kappa)
    assert ax.get_yscale() == "log" and "KL" in ax.get_ylabel()
    E._pyplot().close(figures[0])
    monkeypatch.undo()
    png = E.plot_trust_region(metrics, tmp_path / "tr.png")
    assert png.stat().st_size > 1000
