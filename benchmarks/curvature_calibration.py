"""
How well does each curvature proxy predict the KL a step of the adapters really causes?

    python benchmarks/curvature_calibration.py --model smollm2          # about 15 minutes, 2 cores
    python benchmarks/curvature_calibration.py --model tiny             # about 2 minutes

For every perturbation δ of the adapters it measures the mean KL(p_before ‖ p_after) over the label
tokens of the batch (no-grad forwards) and the prediction κ of each proxy, and prints the ratio
measured / κ as median [10th–90th percentile] per proxy and perturbation family: the table of
notes/curvature.md ("Calibration"). Perturbations:

    random σ       every adapter tensor p moves by σ·rms(p)·z, z ~ N(0, 1), σ = 1e-3, 1e-2, 1e-1
                   (from a LoRA adapter trained for a few steps, so that B ≠ 0)
    <method> lr    the first optimizer steps of each method (CTR-LoRA without its trust region) at
                   lr 1e-3, 1e-2, 1e-1, each step on its own batch

Every proxy is evaluated on the exact change of each adapted layer, δW = c(B′A′ − BA), written as
U Vᵀ with U = c[B′, B] and Vᵀ = [A′; −A], so no d_out × d_in matrix is formed. With per-position
rows x_s (inputs) and ĝ_s = ∂(Σ_t ℓ_t)/∂y_s (output gradients of the summed loss; N label tokens):

    expand   ½ (n/N) tr(Γ δW S δWᵀ), S = mean_s x xᵀ, Γ = mean_s ĝ ĝᵀ over n rows     (full or diag)
    reduce   ½ (B/N) tr(Γ̄ δW S̄ δWᵀ), per sequence x̄ = mean_s x, ḡ = Σ_s ĝ          (full)
    exact-seq  ½ (1/N) Σ_b (Σ_ℓ Σ_{s∈b} ĝ_sᵀ δW_ℓ x_s)²: the sampled Fisher along δ, positions and
               layers coupled (one label sample per token; no Kronecker or independence assumption)
    GGN      ½ (1/N) Σ_t (J_t δ)ᵀ (diag p_t − p_t p_tᵀ)(J_t δ), J_t δ by central differences: the
             second-order Taylor term of the KL itself (a reference, not a cheap proxy)
    hessian  ½ Σ_p h_p δp², h = Hutchinson diagonal of the loss Hessian in adapter parameters

"labels" rows are the label positions (SPEC §2's K-FAC tokens), "all" rows every position up to the
last label of its sequence (those carry gradient through attention); "emp" uses the data labels,
"smp" labels drawn from the model; "EMA" is a running average (β = 0.95) over the run's earlier
steps, the others use the step's own batch.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adapters as A  # noqa: E402
import curvature as C  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from convert_gguf import ensure_default_model  # noqa: E402

METHODS = ("lora", "adalora", "triadapt", "ctr", "cg")
LRS = (1e-3, 1e-2, 1e-1)
SIGMAS = (1e-3, 1e-2, 1e-1)


# --- the rows every proxy is built from ------------------------------------------------------

def capture_rows(net, layers: dict, ids, labels, targets) -> dict:
    """One forward and backward of Σ_t CE(z_t, targets_t) over the label positions; returns
    {layer: (x (B, T, d_in), ĝ (B, T, d_out))} in fp32, ĝ the output gradient of the summed loss."""
    rows, handles = {}, []

    def hook(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach().float()

            def grad_hook(g):
                rows[name] = (x, g.detach().float())
            output.register_hook(grad_hook)
        return forward_hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook(name)))
    try:
        mask = labels != -100
        logits = net.label_logits(ids, mask).float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        params = [p for p in net.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return rows


def sample_targets(net, ids, labels, generator) -> torch.Tensor:
    with torch.no_grad():
        probs = net.label_logits(ids, labels != -100).float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def masks(labels):
    return {"labels": labels != -100, "all": C.positions_up_to_last_label(labels)}


# --- the step as U Vᵀ per layer --------------------------------------------------------------

def factors(layers: dict) -> dict:
    with torch.no_grad():
        return {n: tuple(t.detach().float().clone() if torch.is_tensor(t) else t
                         for t in m.forward_factors()) for n, m in layers.items()}


def low_rank_step(before: dict, after: dict) -> dict:
    """{layer: (U (d_out, k), Vᵀ (k, d_in))} with U Vᵀ = c(B′A′ − BA) exactly."""
    out = {}
    for n in before:
        (A0, B0, c), (A1, B1, _) = before[n], after[n]
        out[n] = (c * torch.cat([B1, B0], dim=1), torch.cat([A1, -A0], dim=0))
    return out


# --- the proxies -------------------------------------------------------------------------------

def expand_terms(x, g, U, Vt):
    """(tr(Γ δW S δWᵀ) with full factors, the same with diagonal factors) over the rows given."""
    n = x.shape[0]
    gu, xv = g @ U, x @ Vt.T                                              # (n, k)
    full = float(((gu.T @ gu) * (xv.T @ xv)).sum()) / n ** 2
    s, gamma = (x * x).mean(0), (g * g).mean(0)
    diag = float(((Vt * s) @ Vt.T * ((U.T * gamma) @ U)).sum())
    return full, diag


def predictions(rows: dict, labels, step: dict) -> dict:
    """κ of every row-based proxy for one step; rows from capture_rows."""
    N = int((labels != -100).sum())
    out = {}
    for rows_name, mask in masks(labels).items():
        n = int(mask.sum())
        full = diag = 0.0
        for name, (U, Vt) in step.items():
            x, g = rows[name]
            f, d = expand_terms(x[mask], g[mask], U, Vt)
            full, diag = full + f, diag + d
        out[f"expand full {rows_name}"] = 0.5 * n / N * full
        out[f"expand diag {rows_name}"] = 0.5 * n / N * diag
    keep = masks(labels)["all"]                                             # reduce and exact-seq
    B = labels.shape[0]
    reduce_sum, seq = 0.0, torch.zeros(B)
    for name, (U, Vt) in step.items():
        x, g = rows[name]
        w = keep.unsqueeze(-1).float()
        xbar = (x * w).sum(1) / w.sum(1).clamp_min(1)                       # (B, d_in)
        gsum = (g * w).sum(1)                                               # (B, d_out)
        gu, xv = gsum @ U, xbar @ Vt.T
        reduce_sum += float(((gu.T @ gu) * (xv.T @ xv)).sum()) / B ** 2
        seq += (((g @ U) * (x @ Vt.T)).sum(-1) * keep).sum(1)               # Σ_s ĝᵀ δW x per b
    out["reduce full all"] = 0.5 * B / N * reduce_sum
    out["exact-seq all"] = 0.5 * float((seq ** 2).sum()) / N
    return out


@torch.no_grad()
def log_probs(net, ids, labels) -> torch.Tensor:
    """(N, V) log-probabilities at the label positions, in float64: the KL of a small step is a
    sum of tiny differences over the vocabulary, which fp32 sums bury in rounding (~1e-7)."""
    return F.log_softmax(net.label_logits(ids, labels != -100).double(), -1)


@torch.no_grad()
def measured_kl(net, ids, labels, logp_before) -> float:
    logp = log_probs(net, ids, labels)
    return float((logp_before.exp() * (logp_before - logp)).sum(-1).mean())


@torch.no_grad()
def ggn_prediction(net, layers: dict, step: dict, ids, labels, logp_before, scale: float) -> float:
    """½ mean_t (Jδ)ᵀ(diag p − p pᵀ)(Jδ), Jδ = (z(W + hδW) − z(W − hδW)) / 2h, W the weights."""
    mask = labels != -100
    dense = {n: U @ Vt for n, (U, Vt) in step.items()}
    zs = []
    for sign in (1.0, -1.0):
        for n, layer in layers.items():
            layer.weight.add_(dense[n].to(layer.weight.dtype), alpha=sign * scale)
        zs.append(net.label_logits(ids, mask).double())
        for n, layer in layers.items():
            layer.weight.sub_(dense[n].to(layer.weight.dtype), alpha=sign * scale)
    jd = (zs[0] - zs[1]) / (2 * scale)                                       # (N, V)
    p = logp_before.exp()
    quad = (p * jd ** 2).sum(-1) - (p * jd).sum(-1) ** 2
    return 0.5 * float(quad.mean())


def hessian_diagonal(net, params, ids, labels, probes: int, generator) -> list:
    with torch.enable_grad():
        diag = C.hutchinson_diagonal(lambda: net(ids, labels=labels), params, n_samples=probes,
                                     model=net, generator=generator)
    return [d.clamp_min(0) for d in diag]


# --- one model ---------------------------------------------------------------------------------

def load(model_name: str, workdir: Path):
    if model_name == "smollm2":
        return ensure_default_model()
    from tests.conftest import write_hf_tiny_with_tokenizer
    small = write_hf_tiny_with_tokenizer(workdir / "tiny", 3, ensure_default_model())
    out = workdir / "tiny-trained"      # as tests/test_ctr.py: confident predictions
    T.train(T.TrainConfig(model=str(small), val_data="", out=str(out), method="full", lr=3e-3,
                          steps=60, batch_size=8, warmup_steps=5, log_every=60, eval_every=0,
                          save_every=0))
    return out / "model"                # the run's HF model folder


def batch_list(tok, n: int, batch_size: int, seed: int):
    examples = D.encode_dataset(D.load_jsonl(REPO / "data" / "wordnet_train.jsonl"), tok, 64)
    batcher = D.Batcher(examples, batch_size, tok.pad_id, seed=seed)
    return [next(batcher) for _ in range(n)]


def adapter_config(method: str, steps: int) -> A.AdapterConfig:
    return A.AdapterConfig(method=method, r=8, alpha=16.0, targets=list(A.LLAMA_LINEAR_NAMES),
                           total_steps=100, t_init=1, t_final=10, delta_t=2, tri_warmup=1,
                           tri_interval=2, tri_final=60, ctr_trust_region=False, cg_batches=2)


class Recorder:
    def __init__(self):
        self.records = []
        self.ema: dict = {}

    def add(self, family: str, measured: float, preds: dict):
        self.records.append({"family": family, "measured": measured, "predicted": preds})


def ema_predictions(rec: Recorder, key: str, rows: dict, labels, step: dict, beta=0.95) -> dict:
    """Running averages (β) of the diagonal and full expand factors of earlier steps, then κ."""
    N = int((labels != -100).sum())
    out = {}
    for rows_name, mask in masks(labels).items():
        n = int(mask.sum())
        full = diag = 0.0
        for name, (U, Vt) in step.items():
            x, g = rows[name]
            x, g = x[mask], g[mask]
            new = {"S": x.T @ x / n, "G": g.T @ g / n, "ratio": torch.tensor(n / N)}
            slot = (key, rows_name, name)
            rec.ema[slot] = C.ema_update(rec.ema.get(slot), new, beta)
            S, G, ratio = rec.ema[slot]["S"], rec.ema[slot]["G"], float(rec.ema[slot]["ratio"])
            full += ratio * float(((U.T @ G @ U) * (Vt @ S @ Vt.T)).sum())
            s, gamma = S.diagonal(), G.diagonal()
            diag += ratio * float(((Vt * s) @ Vt.T * ((U.T * gamma) @ U)).sum())
        out[f"EMA expand full {rows_name}"] = 0.5 * full
        out[f"EMA expand diag {rows_name}"] = 0.5 * diag
    return out


def evaluate_step(net, layers, batch, before, after, logp_before, rows_emp, rows_smp,
                  hess=None, params_delta=None) -> tuple[float, dict]:
    ids, labels = batch["input_ids"], batch["labels"]
    step = low_rank_step(before, after)
    kl = measured_kl(net, ids, labels, logp_before)
    preds = {}
    for kind, rows in (("emp", rows_emp), ("smp", rows_smp)):
        preds.update({f"{k} {kind}": v for k, v in predictions(rows, labels, step).items()})
    scale = min(1.0, max(1e-3, math.sqrt(1e-5 / max(kl, 1e-12))))
    preds["GGN (reference)"] = ggn_prediction(net, layers, step, ids, labels, logp_before, scale)
    if hess is not None:
        preds["hessian diag"] = 0.5 * sum(float((h * d.float() ** 2).sum())
                                          for h, d in zip(hess, params_delta))
    return kl, preds, step


def run_model(model_name: str, args, rec: Recorder):
    workdir = Path(tempfile.mkdtemp())
    path = load(model_name, workdir)
    base, tok = M.load_model_and_tokenizer(path, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    hess_probes = args.hessian_probes

    # random perturbations around a LoRA adapter trained for a few steps
    net = M.load_pretrained(path, torch.float32, "cpu")
    torch.manual_seed(0)
    cfg = adapter_config("lora", 10)
    A.apply_method(net, "lora", cfg)
    layers = A.adapter_layers(net)
    params = A.optimizer_parameters(net)
    opt = torch.optim.AdamW(params, lr=1e-3)
    hooks = A.training_hooks(net, cfg)
    for b in batch_list(tok, 5, args.batch_size, seed=11):
        T.accumulate_gradients(net, [b], D.count_label_tokens(b), "cpu", method=hooks)
        T.optimizer_step(opt, params, hooks, 0, clip=1.0)
    net.eval()
    batch = batch_list(tok, 1, args.batch_size, seed=12)[0]
    ids, labels = batch["input_ids"], batch["labels"]
    logp_before = log_probs(net, ids, labels)
    rows_emp = capture_rows(net, layers, ids, labels, labels[labels != -100])
    rows_smp = capture_rows(net, layers, ids, labels, sample_targets(net, ids, labels, gen))
    hess = hessian_diagonal(net, params, ids, labels, hess_probes, gen) if hess_probes else None
    before = factors(layers)
    for sigma in SIGMAS:
        for rep in range(args.repeats):
            saved = [p.detach().clone() for p in params]
            deltas = []
            with torch.no_grad():
                for p in params:
                    rms = float(p.float().pow(2).mean().sqrt()) or 1e-3
                    d = sigma * rms * torch.randn(p.shape, generator=gen)
                    p.add_(d)
                    deltas.append(d)
            after = factors(layers)
            kl, preds, _ = evaluate_step(net, layers, batch, before, after, logp_before, rows_emp,
                                         rows_smp, hess, deltas)
            rec.add(f"{model_name} random σ={sigma:g}", kl, preds)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        print(f"{model_name} random σ={sigma:g} done", file=sys.stderr, flush=True)

    # the first AdamW steps of each method
    for method in args.methods:
        for lr in LRS:
            t0 = time.perf_counter()
            net = M.load_pretrained(path, torch.float32, "cpu")
            torch.manual_seed(0)
            cfg = adapter_config(method, args.steps)
            A.apply_method(net, method, cfg)
            hooks = A.training_hooks(net, cfg)
            batches = batch_list(tok, args.steps + hooks.calibration_batches, args.batch_size,
                                 seed=21)
            if hooks.calibration_batches:
                hooks.calibrate([(b["input_ids"], b["labels"])
                                 for b in batches[:hooks.calibration_batches]])
                batches = batches[hooks.calibration_batches:]
            params = A.optimizer_parameters(net)
            opt = torch.optim.AdamW([{"params": params, "start_step": 0}], lr=lr)
            key = f"{method}-{lr:g}"
            for step, b in enumerate(batches):
                ids, labels = b["input_ids"], b["labels"]
                net.eval()
                layers = A.adapter_layers(net)
                logp_before = log_probs(net, ids, labels)
                rows_emp = capture_rows(net, layers, ids, labels, labels[labels != -100])
                rows_smp = capture_rows(net, layers, ids, labels,
                                        sample_targets(net, ids, labels, gen))
                use_hess = hess_probes and args.hessian_steps
                old = [p.detach().clone() for p in params]
                hess = (hessian_diagonal(net, params, ids, labels, hess_probes, gen) if use_hess
                        else None)
                before = factors(layers)
                net.train()
                T.accumulate_gradients(net, [b], D.count_label_tokens(b), "cpu", method=hooks)
                _, new = T.optimizer_step(opt, params, hooks, step, clip=1.0)
                net.eval()
                # growth appends blocks: their old value is the function-preserving init
                if new:
                    continue
                deltas = [p.detach() - o for p, o in zip(params, old)]
                after = factors(layers)
                kl, preds, low_rank = evaluate_step(net, layers, b, before, after, logp_before,
                                                    rows_emp, rows_smp, hess, deltas)
                for kind, rows in (("emp", rows_emp), ("smp", rows_smp)):
                    ema = ema_predictions(rec, f"{key}-{kind}", rows, labels, low_rank)
                    preds.update({f"{k} {kind}": v for k, v in ema.items()})
                rec.add(f"{model_name} {method} lr={lr:g}", kl, preds)
            hooks.close()
            rec.ema.clear()                     # (full factors: ~1 GB per run on SmolLM2)
            if args.json:
                Path(args.json).write_text(json.dumps(rec.records))
            print(f"{model_name} {method} lr={lr:g}: {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)


# --- the table -----------------------------------------------------------------------------------

def quantile(values, q):
    values = sorted(values)
    i = (len(values) - 1) * q
    lo, hi = math.floor(i), math.ceil(i)
    return values[lo] + (values[hi] - values[lo]) * (i - lo)


def table(records, small_kl: float, floor: float = 1e-9) -> str:
    """Rows: proxies; columns: perturbation groups; cells: median [p10, p90] of measured / κ.
    Steps whose measured KL is below `floor` (float64 rounding of the forward) are left out."""
    dropped = sum(1 for r in records if r["measured"] < floor)
    records = [r for r in records if r["measured"] >= floor]
    def group(r):
        model, *rest = r["family"].split(" ")
        kind = "random" if rest[0] == "random" else "AdamW steps"
        size = "small" if r["measured"] < small_kl else "large"
        return f"{model} {kind} ({size})"
    groups = sorted({group(r) for r in records})
    proxies = sorted({p for r in records for p in r["predicted"]})
    lines = ["| proxy | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for proxy in proxies:
        cells = []
        for g in groups:
            ratios = [r["measured"] / r["predicted"][proxy] for r in records
                      if group(r) == g and proxy in r["predicted"] and r["predicted"][proxy] > 0
                      and r["measured"] > 0]
            if not ratios:
                cells.append("–")
                continue
            med = statistics.median(ratios)
            cells.append(f"{med:.3g} [{quantile(ratios, 0.1):.2g}, {quantile(ratios, 0.9):.2g}] "
                         f"n={len(ratios)}")
        lines.append(f"| {proxy} | " + " | ".join(cells) + " |")
    counts = {g: sum(1 for r in records if group(r) == g) for g in groups}
    lines.append("")
    lines.append("perturbations per column: " + ", ".join(f"{g}: {n}" for g, n in counts.items())
                 + f"; {dropped} left out (measured KL < {floor:g})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--model", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per method and lr")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4, help="random perturbations per scale")
    ap.add_argument("--hessian-probes", type=int, default=4,
                    help="Hutchinson probes of the hessian proxy (0: skip it)")
    ap.add_argument("--hessian-steps", action="store_true",
                    help="also the hessian proxy for the methods' steps (slow on SmolLM2)")
    ap.add_argument("--small-kl", type=float, default=1e-2,
                    help="measured KL below which a step counts as small (nats per token)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write every record here")
    ap.add_argument("--from-json", nargs="+", help="print the table of saved records instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        print(table(records, args.small_kl))
        return
    rec = Recorder()
    t0 = time.perf_counter()
    for model_name in args.model:
        run_model(model_name, args, rec)
    if args.json:
        Path(args.json).write_text(json.dumps(rec.records))
    print(table(rec.records, args.small_kl))
    print(f"\n{len(rec.records)} perturbations in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
