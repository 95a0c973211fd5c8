"""
Second-order proxies for curvature-aware LoRA: K-FAC factors, Fisher statistics, Hessian-vector
products, Hutchinson estimators, power iteration, metric norms of low-rank steps and the
curvature-whitened gradient SVD.

Notation is SPEC.md §2. A target linear `y = W0 x`, W0 ∈ R^{d_out×d_in}; the N label-carrying tokens
of a batch give rows x_t ∈ R^{d_in} and per-token output gradients ĝ_t = ∂ℓ_t/∂y_t ∈ R^{d_out}
(batch loss L = mean_t ℓ_t).

    S = (1/N) Σ_t x_t x_tᵀ   (d_in×d_in)      Γ = (1/N) Σ_t ĝ_t ĝ_tᵀ   (d_out×d_out)      F ≈ S ⊗ Γ
    s = diag(S), γ = diag(Γ)                   (the lightweight proxies that scale to 7B–13B)
    A S Aᵀ = mean_t h_t h_tᵀ, h_t = A x_t      (r×r, from the adapter)
    Bᵀ Γ B = mean_t u_t u_tᵀ, u_t = Bᵀ ĝ_t     (r×r, from the adapter)
    ‖δW‖²_F = vec(δW)ᵀ (S ⊗ Γ) vec(δW) = tr(Γ δW S δWᵀ),   predicted KL = ½ ‖δW‖²_F

Standard ideas (written from the papers, no code copied): K-FAC (Martens & Grosse 2015, "Optimizing
Neural Networks with Kronecker-factored Approximate Curvature") — hooks collect S and Γ, running
averages, damped inverses by eigh, as in kfac-pytorch; Hessian-vector products by double backward
(Pearlmutter 1994); Hutchinson's estimator (Hutchinson 1989) of the trace and (Bekas et al. 2007) of
the diagonal; power iteration for the top eigenvalue, as PyHessian (Yao et al. 2020) does;
randomized SVD (Halko, Martinsson & Tropp 2011) and single-pass sketches (Tropp, Yurtsever, Udell &
Cevher 2017). This project's choices are marked "(ours)" in the docstrings.

Contents, top to bottom:
  1. Conventions in one place: which rows are tokens (masking), the per-token gradient scale,
     fp32 statistics
  2. K-FAC statistics: KFACFactors, KFACCollector (hooks), collect_fisher (empirical or
     sampled-label Fisher)
  3. Factor algebra: ema_update, damping_value, damp, damped_power (inverse, inverse square root
     by eigh in fp32)
  4. Metric norms: metric_norm_sq (dense reference), low_rank_metric_norm_sq (r×r traces),
     predicted_kl
  5. Hessian products: twice_differentiable, hessian_operator, hvp, hutchinson_trace,
     hutchinson_diagonal, power_iteration, hessian_top_eigenvalue
  6. Whitened gradient SVD for CG-LoRA (SPEC §6): whitened_svd_init (dense), randomized_svd
     (callables), sketch_svd + WhitenedGradientSketch (one pass, O((d_in + d_out)·r) memory)

Factors are passed around as tensors that are either full (2-D, (d, d)) or diagonal (1-D, (d,));
every function here accepts both, so "diagonal first, full for teaching" is one code path.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensors = Sequence[torch.Tensor]

# --------------------------------------------------------------------------------------------------
# 1. Conventions in one place
# --------------------------------------------------------------------------------------------------


def per_token_grad_scale(reduction: str, n_loss_tokens: int) -> float:
    """The factor that turns the output gradient seen by backward into the per-token gradient
    ĝ_t = ∂ℓ_t/∂y_t.

    THE scaling convention of this file (SPEC §2), used nowhere else: with a mean loss
    L = (1/N) Σ_t ℓ_t the backward delivers ∂L/∂y_t = ĝ_t / N, so ĝ_t = N · ∂L/∂y_t and
    Γ = (1/N) Σ ĝ ĝᵀ is the covariance of per-token gradients, independent of N. With gradient
    accumulation (loss of a micro-batch = its summed ℓ divided by the number of label tokens of the
    whole optimizer step) pass that step-wide count as n_loss_tokens. With a summed loss the scale
    is 1.
    """
    if reduction == "mean":
        if n_loss_tokens < 1:
            raise ValueError(f"a mean loss over {n_loss_tokens} tokens has no gradient; "
                             f"the batch has no labels")
        return float(n_loss_tokens)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"unknown loss reduction {reduction!r}; use 'mean' or 'sum'")


def token_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of `t` (..., d) that are tokens of the loss, as an fp32 matrix (n, d).

    mask: bool with the leading shape of `t` (e.g. (B, T) for t of shape (B, T, d)): rows where it
    is False — padding, prompt tokens — are dropped. A 2-D `t` with exactly mask.sum() rows is taken
    as already selected: model.py's Llama applies lm_head only to `h[labels != -100]`, so lm_head
    sees (N, C). mask None: every row is a token.
    """
    d = t.shape[-1]
    if mask is None:
        return t.detach().reshape(-1, d).float()
    if t.shape[:-1] == mask.shape:
        return t.detach()[mask].float()
    if t.dim() == 2 and t.shape[0] == int(mask.sum()):
        return t.detach().float()
    raise ValueError(f"token mask of shape {tuple(mask.shape)} does not fit a layer tensor of "
                     f"shape {tuple(t.shape)}; pass the (B, T) mask of the batch that was just run")


def positions_up_to_last_label(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at every position up to the last label of its row, the positions whose
    outputs reach a label's prediction under causal attention (those after it are padding)."""
    return (labels != -100).flip(1).cumsum(1).flip(1) > 0


def sequence_rows(t: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One fp32 row per sequence of `t` (B, T, d) for K-FAC "reduce" (Eschenhagen et al. 2023):
    the mean ("mean", inputs) or the sum ("sum", output gradients) over the positions where mask
    (B, T) is True; sequences without such positions are dropped."""
    if t.dim() != 3:
        raise ValueError(f"K-FAC reduce needs the (batch, positions, features) layout, got a layer "
                         f"tensor of shape {tuple(t.shape)}")
    w = (torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if mask is None else mask)
    keep = w.any(1)
    w = w[keep].unsqueeze(-1).float()                                       # (B', T, 1)
    summed = (t.detach()[keep].float() * w).sum(1)                          # (B', d)
    return summed / w.sum(1) if how == "mean" else summed


@contextmanager
def _fp32_statistics(device: torch.device):
    """Statistics are accumulated in fp32 even inside an autocast region (bf16 sums of x xᵀ lose the
    small entries)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _lora_projection(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) of an adapted layer, without the scale c
    (SPEC §5 keeps c² apart: H = c²·Γ̃·S̃)."""
    A, B, _ = module.lora_factors()
    return A, B


# --------------------------------------------------------------------------------------------------
# 2. K-FAC statistics
# --------------------------------------------------------------------------------------------------

STATS = ("full", "diag", "projected", "grad")


@dataclass
class KFACFactors:
    """K-FAC statistics of one layer, each a mean over n_tokens label-carrying tokens (fields not
    collected: None).

    S (d_in, d_in), Gamma (d_out, d_out)   full factors                  [stat "full"]
    s (d_in,), gamma (d_out,)              their diagonals               [stat "diag"]
    S_r (r, r), Gamma_r (r, r)             A S Aᵀ and Bᵀ Γ B             [stat "projected"]
    G (d_out, d_in)                        (1/N) Σ ĝ_t x_tᵀ,             [stat "grad"]
                                           the mean-loss gradient over kept tokens
    """
    n_tokens: int = 0
    S: torch.Tensor | None = None
    Gamma: torch.Tensor | None = None
    s: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    S_r: torch.Tensor | None = None
    Gamma_r: torch.Tensor | None = None
    G: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "n_tokens" and getattr(self, f.name) is not None}


class KFACCollector:
    """Collect K-FAC statistics (Martens & Grosse 2015, §3–4) of chosen linear layers with hooks.

        with KFACCollector({"layers.0.q_proj": layer, ...}, stats=("diag", "projected")) as kfac:
            kfac.set_batch(mask=labels != -100)  # (B, T) bool; loss = mean over mask.sum() tokens
            loss = model(idx, labels=labels); loss.backward()
        factors = kfac.factors()  # {name: KFACFactors}, means over all collected tokens

    How each micro-batch is counted exactly once (ours). The forward hook does not record anything:
    it computes the input-side sums of its call (x xᵀ, x², h hᵀ with h = A x) and registers a tensor
    hook on that call's output y. Everything — input sums, output sums, token count — is committed
    together when the backward delivers ∂L/∂y to that hook. Activation checkpointing
    (torch.utils.checkpoint, non-reentrant, as model.py uses) re-runs the forward inside backward,
    so forward hooks fire twice; but the recomputed outputs are only used to refill saved tensors,
    no gradient ever reaches them, so their tensor hooks never fire (verified by the tests, which
    also check that the forward hooks did fire twice). A forward without a backward (evaluation)
    adds nothing. Forward hooks that run with grad disabled, or whose output needs no gradient, are
    ignored. Do not backward the same graph twice (retain_graph=True) while collecting: each
    backward commits once.

    Why tensor hooks on outputs rather than register_full_backward_hook: they need no input that
    requires grad, fire once per use of the layer, and are indifferent to checkpointing.

    Masking: `set_batch(mask)` gives the (B, T) mask of label-carrying positions; rows outside it
    never enter S, Γ or the count (see token_rows). Note that in a transformer ĝ at a prompt
    position is not zero (later tokens attend to it); the mask removes it anyway, following SPEC §2
    (ĝ_t is defined for tokens with a loss ℓ_t).

    Scaling: gradients are multiplied by per_token_grad_scale(reduction, n_loss_tokens) so that Γ is
    built from per-token gradients ∂ℓ_t/∂y_t. Accumulation is in fp32, outside autocast. Only the
    weight part (no bias row).

    stats: any of "full", "diag", "projected" (r×r factors from the layer's adapter factors;
    `projection(module) -> (A, B)` overrides the default `module.lora_factors()`), "grad" (G; keeps
    this call's x rows until backward). Sums (`sums[name][key]`, fp32 tensors) and token counts
    (`counts[name]`, ints) are kept apart from the means, so under DDP all-reducing both before
    factors() gives exactly the statistics of the global batch.
    """

    def __init__(self, modules: dict[str, nn.Module], stats: Iterable[str] = ("diag",),
                 projection: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 approx: str = "expand"):
        if approx not in ("expand", "reduce"):
            raise ValueError(f"K-FAC approx must be expand or reduce, got {approx!r}")
        self.approx = approx
        self.stats = tuple(stats)
        unknown = [s for s in self.stats if s not in STATS]
        if unknown or not self.stats:
            raise ValueError(f"unknown or empty stats {list(self.stats)}; "
                             f"choose from {', '.join(STATS)}")
        self.modules = dict(modules)
        self.projection = projection or _lora_projection
        if "projected" in self.stats and projection is None:
            for name, module in self.modules.items():
                if not hasattr(module, "lora_factors"):
                    raise ValueError(f"{name} ({type(module).__name__}) has no lora_factors(); "
                                     f"'projected' statistics need adapted layers, or pass "
                                     f"projection=callable(module) -> (A, B)")
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.modules}
        self.counts: dict[str, int] = {name: 0 for name in self.modules}
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._scale: float | None = None
        self._batch_set = self._paused = False

    # --- what the training loop calls -------------------------------------------------------------
    def set_batch(self, mask: torch.Tensor | None, reduction: str = "mean",
                  n_loss_tokens: int | None = None):
        """Describe the batch about to run: its (B, T) bool mask of label tokens and how its loss
        was reduced.

        n_loss_tokens: the N the loss is divided by (default: mask.sum(); without a mask, the rows
        each layer sees). Applies to every following forward until called again.
        """
        if mask is not None and mask.dtype != torch.bool:
            raise ValueError(f"the token mask must be bool (True = token has a label), "
                             f"got {mask.dtype}")
        self._mask = mask
        if reduction == "mean" and n_loss_tokens is None:
            self._scale = None if mask is None else per_token_grad_scale("mean", int(mask.sum()))
        else:
            self._scale = per_token_grad_scale(reduction, n_loss_tokens or 0)
        self._batch_set, self._paused = True, False

    def factors(self) -> dict[str, KFACFactors]:
        """{name: KFACFactors} with every sum divided by that layer's token count."""
        out = {}
        for name, sums in self.sums.items():
            n = self.counts[name]
            if n == 0:
                raise RuntimeError(f"no tokens were collected for {name}: run forward and "
                                   f"backward inside the collector (with grad enabled and "
                                   f"something upstream requiring grad)")
            out[name] = KFACFactors(n_tokens=n, **{k: v / n for k, v in sums.items()})
        return out

    def all_reduce(self, reduce_sum: Callable[[list[torch.Tensor]], None]) -> None:
        """Sum the statistics over DDP ranks in place (reduce_sum sums a list of tensors over the
        ranks), so that factors() gives the statistics of the global batch. Every rank must have
        collected the same statistics."""
        names = list(self.sums)
        tensors = [self.sums[n][k] for n in names for k in sorted(self.sums[n])]
        device = tensors[0].device if tensors else torch.device("cpu")
        counts = torch.tensor([float(self.counts[n]) for n in names], dtype=torch.float64,
                              device=device)
        reduce_sum(tensors + [counts])
        self.counts = {n: int(c) for n, c in zip(names, counts.tolist())}

    def reset(self):
        self.sums = {name: {} for name in self.modules}
        self.counts = {name: 0 for name in self.modules}

    def pause(self):
        """Collect nothing until the next set_batch: forwards and backwards in between (evaluation,
        generation, a user's own passes) leave the statistics alone."""
        self._batch_set, self._paused = False, True

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- the hooks --------------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return                                      # no backward will come for this call
            if self._paused:
                return                                      # outside a training step
            if not self._batch_set:
                raise RuntimeError(
                    "KFACCollector: call set_batch(mask, ...) before the forward pass")
            # captured: the batch may change before this backward
            mask = self._mask
            with _fp32_statistics(output.device):
                x = (token_rows(inputs[0], mask) if self.approx == "expand"  # (n, d_in) fp32
                     else sequence_rows(inputs[0], mask, "mean"))                # (B', d_in)
                scale = (self._scale if self._scale is not None
                         else per_token_grad_scale("mean", x.shape[0]))
                pending = {}
                if "full" in self.stats:
                    pending["S"] = x.T @ x                  # (d_in, d_in)  Σ x xᵀ
                if "diag" in self.stats:
                    pending["s"] = (x * x).sum(0)           # (d_in,)       Σ x²
                B = None
                if "projected" in self.stats:
                    A, B = self.projection(module)
                    h = x @ A.detach().float().T            # (n, r)        h = A x
                    pending["S_r"] = h.T @ h                # (r, r)        Σ h hᵀ
                    B = B.detach().float()
            keep_x = x if "grad" in self.stats else None
            n = x.shape[0]

            # runs once, when backward reaches this call's output
            def grad_hook(grad):
                with _fp32_statistics(grad.device):
                    g = (token_rows(grad, mask) if self.approx == "expand"
                         else sequence_rows(grad, mask, "sum")) * scale  # per-token ĝ_t = ∂ℓ_t/∂y_t
                    if "full" in self.stats:
                        pending["Gamma"] = g.T @ g          # (d_out, d_out)
                    if "diag" in self.stats:
                        pending["gamma"] = (g * g).sum(0)   # (d_out,)
                    if B is not None:
                        u = g @ B                           # (n, r)      u = Bᵀ ĝ
                        pending["Gamma_r"] = u.T @ u
                    if "grad" in self.stats:
                        pending["G"] = g.T @ keep_x         # (d_out, d_in)  Σ ĝ xᵀ
                    sums = self.sums[name]
                    for key, value in pending.items():
                        sums[key] = sums[key] + value if key in sums else value
                    self.counts[name] += n

            output.register_hook(grad_hook)
        return hook


@contextmanager
def _requires_grad(tensors: Tensors):
    """Temporarily set requires_grad on (frozen) tensors; restores the flags afterwards."""
    before = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, before):
            t.requires_grad_(flag)


def _logits_at_labels(model: nn.Module, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, vocab) logits of the label-carrying positions only (the LM head is a large share of
    compute)."""
    if hasattr(model, "label_logits"):                                  # model.py's Llama
        return model.label_logits(inputs, mask)
    return model(inputs)[mask]


def collect_fisher(model: nn.Module, modules: dict[str, nn.Module],
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   kind: str = "empirical", stats: Iterable[str] = ("diag",),
                   generator: torch.Generator | None = None,
                   projection=None) -> dict[str, KFACFactors]:
    """K-FAC factors of `modules` over `batches` of (inputs, labels), labels = -100 where there is
    no loss.

    kind "empirical": ĝ_t = ∂ℓ(y_data)/∂y_t — the gradient of the training loss
                      (the "empirical Fisher").
    kind "sampled":   ĝ_t = ∂ℓ(ỹ_t)/∂y_t with ỹ_t ~ softmax(logits_t) drawn from the model — the
                      true Fisher E_{ỹ~p}[g gᵀ] in expectation (Martens & Grosse 2015 §5); one extra
                      backward per batch when a training step also needs the data-label gradient.
    model(inputs) must return logits (..., vocab) (model.py's Llama: only labelled positions go
    through lm_head). The backward is `torch.autograd.grad` w.r.t. the hooked layers' weights (their
    requires_grad is switched on for the call and restored), so it works on a fully frozen model and
    never touches any `.grad`.
    """
    if kind not in ("empirical", "sampled"):
        raise ValueError(f"unknown Fisher kind {kind!r}; use 'empirical' or 'sampled'")
    weights = [m.weight for m in modules.values()]
    collector = KFACCollector(modules, stats, projection)
    with collector, _requires_grad(weights):
        for inputs, labels in batches:
            mask = labels != -100  # (B, T) label-carrying positions
            collector.set_batch(mask, reduction="mean")
            logits = _logits_at_labels(model, inputs, mask).float()       # (N, vocab)
            if kind == "empirical":
                targets = labels[mask]
            else:
                with torch.no_grad():
                    targets = torch.multinomial(logits.softmax(-1), 1,
                                                generator=generator).squeeze(-1)  # (N,)
            loss = F.cross_entropy(logits, targets)                        # mean over the N tokens
            # fires the collector's tensor hooks
            torch.autograd.grad(loss, weights, allow_unused=True)
    return collector.factors()


# --------------------------------------------------------------------------------------------------
# 3. Factor algebra: running averages, damping, inverse powers
# --------------------------------------------------------------------------------------------------

def ema_update(running, new, beta: float):
    """running ← β·running + (1−β)·new, for a tensor, a KFACFactors, or a dict or list of them;
    `running` None → `new`.

    Starting from the first value (no bias correction) as kfac-pytorch does. n_tokens of KFACFactors
    is summed.
    """
    if running is None:
        return new
    if isinstance(new, dict):
        return {k: ema_update(running.get(k), v, beta) for k, v in new.items()}
    if isinstance(new, (list, tuple)):
        return [ema_update(r, v, beta) for r, v in zip(running, new)]
    if isinstance(new, KFACFactors):
        mixed = {k: ema_update(getattr(running, k), v, beta) for k, v in new.tensors().items()}
        return replace(new, n_tokens=running.n_tokens + new.n_tokens, **mixed)
    return beta * running + (1.0 - beta) * new


def damping_value(factor: torch.Tensor, rel_damping: float) -> float:
    """λ = rel_damping · mean(diag factor) — damping relative to the factor's scale (SPEC §2)."""
    diag = factor if factor.dim() == 1 else factor.diagonal()
    mean_diag = float(diag.float().mean())
    if not mean_diag > 0:
        raise ValueError("a curvature factor with zero (or NaN) mean diagonal cannot be damped or "
                         "inverted: were any tokens collected for this layer?")
    return rel_damping * mean_diag


def damp(factor: torch.Tensor, rel_damping: float = 1e-3) -> torch.Tensor:
    """S + λ·I with λ = rel_damping·mean(diag S); for a diagonal factor s + λ."""
    lam = damping_value(factor, rel_damping)
    if factor.dim() == 1:
        return factor + lam
    return factor + lam * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)


def damped_power(factor: torch.Tensor, power: float, rel_damping: float = 1e-3) -> torch.Tensor:
    """(S + λI)^power by eigendecomposition in fp32: Q diag((max(e, 0) + λ)^power) Qᵀ; elementwise
    for 1-D factors.

    power −1: damped inverse; −½: damped inverse square root (whitening); ½: square root.
    Eigenvalues are clipped at 0 before damping, so roundoff negatives of a PSD factor cannot blow
    up. rel_damping = 0 uses the factor as given (for factors that are already damped); it must then
    be positive definite for negative powers.
    """
    lam = damping_value(factor, rel_damping) if rel_damping > 0 else 0.0
    if factor.dim() == 1:
        return (factor.float().clamp_min(0) + lam) ** power
    e, Q = torch.linalg.eigh(factor.float())                       # e (d,), Q (d, d)
    return (Q * (e.clamp_min(0) + lam) ** power) @ Q.T


def damped_inverse(factor, rel_damping: float = 1e-3):
    return damped_power(factor, -1.0, rel_damping)


def damped_inverse_sqrt(factor, rel_damping: float = 1e-3):
    return damped_power(factor, -0.5, rel_damping)


def _left(factor: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """factor @ X for a full factor (d, d), or diag(factor) @ X (rows scaled) for a diagonal
    one (d,); None = I."""
    if factor is None:
        return X
    return factor[:, None] * X if factor.dim() == 1 else factor @ X


def _right(X: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """X @ factor, or X @ diag(factor) (columns scaled); None = I."""
    if factor is None:
        return X
    return X * factor[None, :] if factor.dim() == 1 else X @ factor


# --------------------------------------------------------------------------------------------------
# 4. Metric norms: ‖δW‖²_F = tr(Γ δW S δWᵀ), predicted KL = ½ of it
# --------------------------------------------------------------------------------------------------

def metric_norm_sq(dW: torch.Tensor, S: torch.Tensor, Gamma: torch.Tensor) -> torch.Tensor:
    """tr(Γ δW S δWᵀ) = vec(δW)ᵀ (S ⊗ Γ) vec(δW) with a dense δW (d_out, d_in): the reference form,
    small layers."""
    dW = dW.float()
    return (_left(Gamma.float(), dW) * _right(dW, S.float())).sum()


def low_rank_metric_norm_sq(B: torch.Tensor, A: torch.Tensor, dB: torch.Tensor | None,
                            dA: torch.Tensor | None, S: torch.Tensor, Gamma: torch.Tensor,
                            scale: float = 1.0) -> torch.Tensor:
    """tr(Γ δW S δWᵀ) for δW = c·(δB A + B δA) without forming δW
    (SPEC §5, CTR-LoRA trust region; ours).

    B, δB: (d_out, r); A, δA: (r, d_in); c = scale; δB or δA None means zero. Derivation: with
    X = Γ^{½} δB A S^{½} and Y = Γ^{½} B δA S^{½}, ‖X + Y‖² = ‖X‖² + 2⟨X, Y⟩ + ‖Y‖², and by the
    cyclic trace

        ‖X‖²   = tr((δBᵀ Γ δB)(A S Aᵀ))
        ⟨X, Y⟩ = tr(S^{½} Aᵀ δBᵀ Γ B δA S^{½}) = tr((δBᵀ Γ B)(δA S Aᵀ))
        ‖Y‖²   = tr((Bᵀ Γ B)(δA S δAᵀ))

    — all r×r. With diagonal factors (Γ = diag γ, S = diag s) this is SPEC §5's form with
    B̃ = diag(√γ) B (rows scaled) and Ã = A diag(√s) (columns scaled):

        tr((δB̃ᵀδB̃)(ÃÃᵀ)) + 2 tr((δB̃ᵀB̃)(δÃÃᵀ)) + tr((B̃ᵀB̃)(δÃδÃᵀ)).

    Cost: O((d_out + d_in)·r²) with diagonal factors; full factors add Γ·B, A·S (d²·r, small
    models only).
    """
    Gamma, S = Gamma.float(), S.float()
    B, A = B.float(), A.float()
    total = torch.zeros((), device=B.device)
    if dB is not None:
        dB = dB.float()
        AS = _right(A, S)                                           # (r, d_in)   A S
        total = total + ((dB.T @ _left(Gamma, dB)) * (AS @ A.T).T).sum()  # tr((δBᵀΓδB)(ASAᵀ))
    if dA is not None:
        dA = dA.float()
        GB = _left(Gamma, B)                                        # (d_out, r)  Γ B
        dAS = _right(dA, S)                                         # (r, d_in)   δA S
        total = total + ((B.T @ GB) * (dAS @ dA.T).T).sum()               # tr((BᵀΓB)(δASδAᵀ))
        if dB is not None:
            total = total + 2 * ((dB.T @ GB) * (dAS @ A.T).T).sum()       # 2 tr((δBᵀΓB)(δASAᵀ))
    return scale ** 2 * total


KL_CHUNK_ELEMENTS = 2 ** 22        # kl_divergence's row blocks: 16 MiB per fp32 temporary


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row (N,) of two (N, vocab) logit matrices, in fp32:
    Σ_v p_v (log p_v − log q_v).

    What the CTR-LoRA trust region measures (p before the step, q after it), and what every
    proxy of this file predicts to second order: KL(p_θ ‖ p_θ+δ) = ½ δᵀ F δ + O(‖δ‖³), F the
    Fisher (= GGN for softmax cross-entropy). Rounding of the vocabulary sum is about 1e-7.

    Computed over blocks of rows of at most KL_CHUNK_ELEMENTS entries: the five temporaries
    (log p, log q, p, the difference, the product) are (rows, vocab) blocks, not (N, vocab)
    matrices (memory.py counts them so). Each row's value does not depend on the blocking.
    """
    rows = max(1, KL_CHUNK_ELEMENTS // logits_p.shape[-1])
    out = []
    for p, q in zip(logits_p.split(rows), logits_q.split(rows)):
        logp, logq = F.log_softmax(p.float(), -1), F.log_softmax(q.float(), -1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out)


def predicted_kl(B, A, dB, dA, S, Gamma, scale: float = 1.0) -> torch.Tensor:
    """½ tr(Γ δW S δWᵀ): the second-order prediction of KL(p_before ‖ p_after) for the step δW
    (Fisher metric)."""
    return 0.5 * low_rank_metric_norm_sq(B, A, dB, dA, S, Gamma, scale)


# --------------------------------------------------------------------------------------------------
# 5. Hessian-vector products, Hutchinson, power iteration (over lists of tensors)
# --------------------------------------------------------------------------------------------------

@contextmanager
def twice_differentiable(model: nn.Module):
    """Run `model` on its twice-differentiable paths, then restore the previous ones: a model.py
    Llama's explicit-softmax attention, every adapted layer's plain-ops forward (modules with a
    `fused` flag), and eager blocks instead of compiled ones (Llama.compile_blocks).

    Why: F.scaled_dot_product_attention has no double backward. Measured with torch 2.13 on CPU
    (fp32, causal): the first backward with create_graph=True succeeds, but the gradients' graph
    contains a NotImplemented node and the second backward raises "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" — an error, not a
    silently wrong number. adapters.LowRankLinearFunction's hand-written backward raises when called
    with create_graph=True (torch's once_differentiable would not do: its error node hangs off
    detached copies, so a Hessian-vector product would silently miss those terms). The plain paths
    differentiate twice correctly.
    """
    previous = getattr(model, "attention_impl", None)
    switched = [m for m in model.modules() if getattr(m, "fused", False) is True]
    # Llama.compile_blocks: compiled graphs have no double backward either, so run eager
    compiled = getattr(model, "compiled_block", None)
    if previous is not None:
        model.set_attention("math")
    for m in switched:
        m.fused = False
    if compiled is not None:
        model.compiled_block = None
    try:
        yield model
    finally:
        if previous is not None:
            model.set_attention(previous)
        for m in switched:
            m.fused = True
        if compiled is not None:
            model.compiled_block = compiled


def _zeros_for_unused(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _explain_double_backward(err: RuntimeError):
    message = str(err)
    if "scaled_dot_product" in message or ("attention" in message and "not implemented" in message):
        raise RuntimeError("Hessian-vector product through fused SDPA attention, which has no "
                           "double backward: pass model=... to hvp/hutchinson/power iteration "
                           "(switches to the plain paths), or run inside "
                           "curvature.twice_differentiable(model)") from err
    raise err


@contextmanager
def hessian_operator(loss_fn: Callable[[], torch.Tensor], params: Tensors,
                     model: nn.Module | None = None):
    """Yield Hv: list of tensors shaped like params -> H v, with H = ∂²L/∂params² at the current
    point.

    One forward and one backward (create_graph=True) are done on entry; every Hv is then one double
    backward (Pearlmutter's trick: H v = ∂/∂θ ⟨∂L/∂θ, v⟩), reusing the graph. params that do not
    require grad (frozen norm weights, W0) are switched on for the duration and restored. If `model`
    is given, the forward runs on its twice-differentiable paths (math attention, unfused adapters;
    see twice_differentiable); without `model`, SDPA or a fused adapter in the graph raises a
    RuntimeError that says so.
    """
    params = list(params)
    with ExitStack() as stack:
        if model is not None:
            stack.enter_context(twice_differentiable(model))
        stack.enter_context(_requires_grad(params))
        loss = loss_fn()
        grads = _zeros_for_unused(
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)

        def Hv(vs: Tensors) -> list[torch.Tensor]:
            dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vs))
            if not dot.requires_grad:                       # loss is linear in params: H = 0
                return [torch.zeros_like(p) for p in params]
            try:
                out = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
            except RuntimeError as err:
                _explain_double_backward(err)
            return [h.detach() for h in _zeros_for_unused(out, params)]
        yield Hv


def hvp(loss_fn: Callable[[], torch.Tensor], params: Tensors, vs: Tensors,
        model: nn.Module | None = None):
    """H v for the Hessian H of loss_fn() w.r.t. params (a list of tensors), by double backward
    (hessian_operator)."""
    with hessian_operator(loss_fn, params, model) as Hv:
        return Hv(vs)


def rademacher_like(params: Tensors,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Independent ±1 entries with probability ½ each, shaped like params."""
    return [(torch.randint(0, 2, p.shape, generator=generator, device=p.device) * 2 - 1).to(p.dtype)
            for p in params]


def hutchinson_trace(loss_fn, params: Tensors, n_samples: int = 100, model: nn.Module | None = None,
                     generator: torch.Generator | None = None) -> tuple[float, float]:
    """tr(H) ≈ mean_k z_kᵀ H z_k with Rademacher z (Hutchinson 1989). Returns (estimate, its
    standard error).

    Unbiased because E[z zᵀ] = I; the variance of one sample is 2 Σ_{i≠j} H_ij² (the diagonal is
    exact).
    """
    samples = []
    with hessian_operator(loss_fn, params, model) as Hv:
        for _ in range(n_samples):
            z = rademacher_like(params, generator)
            samples.append(sum(float((zi * hzi).sum()) for zi, hzi in zip(z, Hv(z))))
    t = torch.tensor(samples, dtype=torch.float64)
    stderr = float(t.std() / math.sqrt(n_samples)) if n_samples > 1 else float("inf")
    return float(t.mean()), stderr


def hutchinson_diagonal(loss_fn, params: Tensors, n_samples: int = 100,
                        model: nn.Module | None = None,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """diag(H) ≈ mean_k z_k ⊙ H z_k with Rademacher z (Bekas, Kokiopoulou & Saad 2007), shaped like
    params.

    Entry i of one sample is H_ii + Σ_{j≠i} H_ij z_i z_j: unbiased, variance Σ_{j≠i} H_ij².
    SPEC §5's "Hessian metric" option for CTR-LoRA uses this on the adapter parameters.
    """
    diag = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with hessian_operator(loss_fn, params, model) as Hv:
        for _ in range(n_samples):
            z = rademacher_like(params, generator)
            for d, zi, hzi in zip(diag, z, Hv(z)):
                d += (zi * hzi).float()
    return [d / n_samples for d in diag]


def power_iteration(matvec: Callable[[list], list], v0: Tensors, n_iter: int = 100,
                    tol: float = 1e-6):
    """The eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector (as in
    PyHessian).

    v ← Hv / ‖Hv‖; λ = vᵀHv (Rayleigh quotient, signed); stops when |λ_k − λ_{k−1}| ≤ tol·|λ_{k−1}|
    or after n_iter. Returns (λ, v, iterations used). Converges at rate |λ₂/λ₁| per step; a near-tie
    needs more iterations.
    """
    def normalized(v):
        norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v))
        return [x / (norm or 1.0) for x in v]                      # H v = 0: λ = 0 on the next step

    v = normalized(list(v0))
    eig = None
    for it in range(1, n_iter + 1):
        Hv = matvec(v)
        new_eig = sum(float((x.double() * y.double()).sum()) for x, y in zip(v, Hv))
        v = normalized(Hv)
        if eig is not None and abs(new_eig - eig) <= tol * abs(eig):
            return new_eig, v, it
        eig = new_eig
    return eig, v, n_iter


def hessian_top_eigenvalue(loss_fn, params: Tensors, model: nn.Module | None = None,
                           n_iter: int = 100, tol: float = 1e-6,
                           generator: torch.Generator | None = None):
    """Largest-magnitude eigenvalue of the Hessian w.r.t. params by power iteration on HVPs
    (PyHessian's method)."""
    with hessian_operator(loss_fn, params, model) as Hv:
        v0 = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
              for p in params]
        return power_iteration(Hv, v0, n_iter, tol)


# --------------------------------------------------------------------------------------------------
# 6. Curvature-whitened gradient SVD (CG-LoRA initialization, SPEC §6)
# --------------------------------------------------------------------------------------------------

@dataclass
class WhitenedSVD:
    """M = Γ^{-½} G S^{-½} (d_out, d_in) — None in the sketched variants —, its top-r SVD
    U (d_out, r), sigma (r,), V (d_in, r), and the CG-LoRA factors B0 (d_out, r), A0 (r, d_in) with
    c·B0 A0 = −η Γ^{-½} [M]_r S^{-½}."""
    M: torch.Tensor | None
    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor
    B0: torch.Tensor
    A0: torch.Tensor
    eta: float


def predicted_step_size(sigma: torch.Tensor, kappa0: float) -> float:
    """η with predicted KL κ0 for the step −η Γ^{-½}[M]_r S^{-½} (SPEC §6; ours): ½ η² Σ σ_i² = κ0.

    sigma: the top-r singular values of M — of one layer, or of all layers concatenated (K-FAC is
    block-diagonal over layers, so the predicted KLs of the layers add up)."""
    energy = float((sigma.double() ** 2).sum())
    if not energy > 0:
        raise ValueError("the whitened gradient is zero: no signal to initialize from "
                         "(check the calibration batches)")
    return math.sqrt(2.0 * kappa0 / energy)


def lora_factors_for_step(U, sigma, V, S_inv_sqrt, Gamma_inv_sqrt, eta: float,
                          lora_scale: float = 1.0):
    """(B0 (d_out, r), A0 (r, d_in)) with c·B0 A0 = −η Γ^{-½} U_r Σ_r V_rᵀ S^{-½} (SPEC §6; ours):

        B0 = −√(η/c) Γ^{-½} U Σ^{½},   A0 = √(η/c) Σ^{½} Vᵀ S^{-½}

    The product fixes the factors only up to B0 D, D⁻¹ A0; Σ^{½} on each side is SPEC §6's split
    (notes/cg_lora.md compared two others: neither helped). S_inv_sqrt / Gamma_inv_sqrt are full
    (d, d), diagonal (d,) or None (identity).
    """
    root = (sigma.clamp_min(0) * eta / lora_scale).sqrt()           # (r,)  √(η/c)·Σ^{½}
    B0 = -_left(Gamma_inv_sqrt, U * root[None, :])                   # (d_out, r)
    A0 = _right(root[:, None] * V.T, S_inv_sqrt)                     # (r, d_in)
    return B0, A0


def lora_init_from_whitened_svd(U, sigma, V, S_inv_sqrt, Gamma_inv_sqrt, kappa0: float,
                                lora_scale: float = 1.0):
    """CG-LoRA factors from the top-r SVD of the whitened gradient (SPEC §6; the paper's stated
    idea, our formulas).

        B0 = −√η Γ^{-½} U_r Σ_r^{½},   A0 = √η Σ_r^{½} V_rᵀ S^{-½},
        so  B0 A0 = −η Γ^{-½} [M]_r S^{-½}
        η from the target predicted KL:  ½ η² ‖[M]_r‖²_F = κ0  →  η = √(2κ0 / Σ σ_i²)

    (‖[M]_r‖²_F = tr(Γ (B0A0/η) S (B0A0/η)ᵀ), so the initial step has predicted KL exactly κ0 in the
    damped metric.) Both factors are divided by √c so that the adapter's ΔW = c·B0·A0 is the step.
    S_inv_sqrt / Gamma_inv_sqrt are full (d, d), diagonal (d,) or None. Returns (B0, A0, η).
    """
    eta = predicted_step_size(sigma, kappa0)
    B0, A0 = lora_factors_for_step(U, sigma, V, S_inv_sqrt, Gamma_inv_sqrt, eta, lora_scale)
    return B0, A0, eta


def solve_step_size(kl_of_eta: Callable[[float], float], kappa0: float, eta0: float,
                    rel_tol: float = 0.02, max_evals: int = 8, max_factor: float = 1e3,
                    min_factor: float = 1e-8) -> tuple[float, float, int]:
    """η with kl_of_eta(η) = κ0 (within rel_tol), by secant steps on log κ(η) against log η (ours).

    For small steps the KL is quadratic, log κ = 2 log η + const, so the first step from η0 uses
    slope 2; later ones use the secant slope of the last two evaluations (clamped to [¼, 4], as the
    KL saturates for large steps), and bisect on log η once a bracket is known and the secant leaves
    it. One step moves η by at most e⁵ ≈ 150×, and η stays in [min_factor, max_factor]·η0 (a KL that
    saturates below κ0 would otherwise send η to overflow). Each evaluation is one measurement (for
    CG-LoRA: one no-grad forward). Returns (η, κ(η), evaluations) of the evaluation closest to κ0 in
    log ratio.
    """
    target = math.log(kappa0)
    lo = hi = None                                                  # log η with κ < κ0 / κ > κ0
    u, points = math.log(eta0), []
    u_min, u_max = u + math.log(min_factor), u + math.log(max_factor)
    for _ in range(max_evals):
        kl = kl_of_eta(math.exp(u))
        f = math.log(max(kl, 1e-30)) - target                       # log(κ/κ0)
        points.append((abs(f), u, kl))
        if abs(f) <= math.log1p(rel_tol):
            break
        if f < 0:
            lo = u if lo is None else max(lo, u)
        else:
            hi = u if hi is None else min(hi, u)
        slope = 2.0
        if len(points) >= 2:
            (_, u1, k1), (_, u2, k2) = points[-2], points[-1]
            if u1 != u2 and k1 > 0 and k2 > 0:
                slope = min(max((math.log(k2) - math.log(k1)) / (u2 - u1), 0.25), 4.0)
        nxt = u - max(min(f / slope, 5.0), -5.0)
        if lo is not None and hi is not None and not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        nxt = min(max(nxt, u_min), u_max)
        if nxt == u:                                                # at a bound: κ0 is out of reach
            break
        u = nxt
    _, u, kl = min(points)
    return math.exp(u), kl, len(points)


def whitened_svd_init(G: torch.Tensor, S: torch.Tensor | None, Gamma: torch.Tensor | None, r: int,
                      kappa0: float, rel_damping: float = 1e-3, lora_scale: float = 1.0,
                      svd: str = "exact",
                      generator: torch.Generator | None = None) -> WhitenedSVD:
    """Dense CG-LoRA initialization: M = Γ^{-½} G S^{-½} with damped factors (full or diagonal),
    top-r SVD, B0, A0.

    With S = I, Γ = I and rel_damping = 0 this is the plain gradient SVD (LoRA-GA / LoRA-One
    family): B0 A0 = −η [G]_r — the built-in ablation; S = Γ = None says the same without
    multiplying by identities (M is G). rel_damping = 0 takes S and Γ as already damped. svd:
    "exact" (full SVD, keep the top r) or "randomized" (randomized_svd with 4r columns and 4 power
    iterations — the top-r SVD LoRA-GA's code computes with torch.svd_lowrank(q=4r, niter=4); far
    cheaper than the full SVD when r ≪ min(d_out, d_in)).
    """
    S_is = None if S is None else damped_inverse_sqrt(S, rel_damping)
    G_is = None if Gamma is None else damped_inverse_sqrt(Gamma, rel_damping)
    M = _right(_left(G_is, G.float()), S_is)                          # (d_out, d_in)
    if svd == "exact":
        U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
        U, sigma, V = U[:, :r], sigma[:r], Vh[:r].T
    elif svd == "randomized":
        U, sigma, V = randomized_svd(lambda Om: M @ Om, lambda Ps: M.T @ Ps, M.shape, r,
                                     oversample=3 * r, n_power_iter=4, generator=generator,
                                     device=M.device)
    else:
        raise ValueError(f"svd must be exact or randomized, got {svd!r}")
    B0, A0, eta = lora_init_from_whitened_svd(U, sigma, V, S_is, G_is, kappa0, lora_scale)
    return WhitenedSVD(M, U, sigma, V, B0, A0, eta)


def randomized_svd(matmat: Callable[[torch.Tensor], torch.Tensor],
                   rmatmat: Callable[[torch.Tensor], torch.Tensor],
                   shape: tuple[int, int], r: int, oversample: int = 10, n_power_iter: int = 2,
                   generator: torch.Generator | None = None, device=None):
    """Top-r SVD of an m×n matrix M known only through products (Halko, Martinsson & Tropp 2011,
    Alg. 4.4 + 5.1).

    matmat(Ω (n, k)) -> M Ω (m, k);  rmatmat(Ψ (m, k)) -> Mᵀ Ψ (n, k). Each call can be a pass over
    calibration batches that accumulates the product, so memory stays O((m + n)·k),
    k = r + oversample. Passes: 2 + 2·n_power_iter. Power iterations sharpen the spectrum
    (error ∝ (σ_{k+1}/σ_r)^{2q+1}). Returns U (m, r), sigma (r,), V (n, r).
    """
    m, n = shape
    k = min(r + oversample, m, n)
    Omega = torch.randn(n, k, generator=generator, device=device)
    # orthonormal basis of range(M Ω)
    Q = torch.linalg.qr(matmat(Omega).float())[0]                   # (m, k)
    for _ in range(n_power_iter):
        Z = torch.linalg.qr(rmatmat(Q).float())[0]                  # (n, k)
        Q = torch.linalg.qr(matmat(Z).float())[0]                   # (m, k)
    Bt = rmatmat(Q).float()                                         # (n, k)  = (Qᵀ M)ᵀ
    Ub, sigma, Vh = torch.linalg.svd(Bt.T, full_matrices=False)     # Qᵀ M = Ub Σ Vh
    return (Q @ Ub)[:, :r], sigma[:r], Vh[:r].T


def sketch_svd(Y: torch.Tensor, W: torch.Tensor, Psi: torch.Tensor, r: int):
    """Top-r SVD from single-pass sketches Y = M Ω (m, k) and W = Ψ M (l, n), l > k
    (Tropp et al. 2017, §4).

    Q = orth(Y) spans the range; X = (Ψ Q)^† W ≈ Qᵀ M solves the small least-squares problem;
    M ≈ Q X, so the SVD of X (k, n) gives M's. Both sketches are linear in M, so they can be summed
    over calibration batches.
    """
    Q = torch.linalg.qr(Y.float())[0]                               # (m, k)
    X = torch.linalg.lstsq(Psi.float() @ Q, W.float()).solution     # (k, n)
    Ux, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
    return (Q @ Ux)[:, :r], sigma[:r], Vh[:r].T


class WhitenedGradientSketch:
    """One-pass sketch of the whitened gradient M = D_γ^{-½} G D_s^{-½} of one layer, with diagonal
    factors (ours; SPEC §6's memory-bounded mode for CG-LoRA).

    The whitening needs s = diag S and γ = diag Γ, known only after the calibration pass. With
    diagonal factors the whitening commutes with the sketch: sketch G itself, Y = G Ω (d_out, k)
    and W = Ψ G (l, d_in), accumulating s and γ in the same pass; afterwards

        M (D_s^{½} Ω) = D_γ^{-½} Y        and        (Ψ D_γ^{½}) M = W D_s^{-½},

    exact single-pass sketches of M with the test matrices Ω' = D_s^{½}Ω and Ψ' = Ψ D_γ^{½}, from
    which sketch_svd recovers M's top-r SVD (Tropp et al. 2017). Memory: Y, W, s, γ, Ω, Ψ, that
    is O((d_in + d_out)·k) with k = r + oversample, l = 2k + 1; no d_out×d_in matrix. With
    identity=True, s = γ = 1 and this is a plain gradient sketch. G gets every position (it is
    ∂L/∂W); s and γ the rows `factor_rows` of each update (K-FAC's label tokens, or all).
    """

    def __init__(self, d_in: int, d_out: int, r: int, oversample: int = 10, identity: bool = False,
                 generator: torch.Generator | None = None, device=None):
        k = min(r + oversample, d_in, d_out)
        l = min(2 * k + 1, d_out)
        self.r, self.identity = r, identity
        self.Omega = torch.randn(d_in, k, generator=generator).to(device)      # (d_in, k)
        self.Psi = torch.randn(l, d_out, generator=generator).to(device)       # (l, d_out)
        self.Y = torch.zeros(d_out, k, device=device)
        self.W = torch.zeros(l, d_in, device=device)
        self.s = torch.zeros(d_in, device=device)
        self.gamma = torch.zeros(d_out, device=device)
        self.n_loss_tokens = 0                  # N: the label tokens G averages over
        self.n_tokens = 0                       # the tokens s and γ average over

    @torch.no_grad()
    def update(self, x: torch.Tensor, g: torch.Tensor, factor_rows: torch.Tensor | None,
               n_loss_tokens: int) -> None:
        """x (n, d_in) inputs and g (n, d_out) = ∂L_b/∂y of every position, L_b the batch's mean
        loss over its n_loss_tokens label tokens: the per-token gradients are ĝ = N · g (the
        factor multiplies the small products, not g). factor_rows: rows s and γ average over."""
        x, g, N = x.float(), g.float(), n_loss_tokens
        self.Y.addmm_(g.T, x @ self.Omega, alpha=N)             # Σ ĝ (xᵀ Ω)  →  N · G Ω
        self.W.addmm_((g @ self.Psi.T).T, x, alpha=N)           # Σ (Ψ ĝ) xᵀ  →  N · Ψ G
        self.n_loss_tokens += N
        if factor_rows is not None:
            x, g = x.index_select(0, factor_rows), g.index_select(0, factor_rows)
        if not self.identity:
            self.s += (x * x).sum(0)
            self.gamma.add_((g * g).sum(0), alpha=N ** 2)
        self.n_tokens += x.shape[0]

    def factors(self, rel_damping: float = 1e-3):
        """(U, σ, V, S^{-½}, Γ^{-½}) of the whitened gradient, S and Γ diagonal and damped
        (None, None with identity=True)."""
        if self.n_loss_tokens == 0:
            raise RuntimeError("the sketch is empty: feed calibration tokens with update() first")
        N, n = self.n_loss_tokens, self.n_tokens
        if self.identity:
            U, sigma, V = sketch_svd(self.Y / N, self.W / N, self.Psi, self.r)
            return U, sigma, V, None, None
        s_is = damped_inverse_sqrt(self.s / n, rel_damping)                     # (d_in,)
        g_is = damped_inverse_sqrt(self.gamma / n, rel_damping)                 # (d_out,)
        Y_M = g_is[:, None] * (self.Y / N)                                      # M Ω'
        W_M = (self.W / N) * s_is[None, :]                                      # Ψ' M
        U, sigma, V = sketch_svd(Y_M, W_M, self.Psi / g_is[None, :], self.r)   # Ψ' = Ψ D_γ^{½}
        return U, sigma, V, s_is, g_is

    def bytes(self) -> int:
        return sum(4 * t.numel() for t in (self.Omega, self.Psi, self.Y, self.W, self.s,
                                           self.gamma))
