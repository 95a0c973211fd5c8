"""Checks for the course assignments in notes/exercises.md that no other test covers.

Where an exercise asks for something the project does not have yet (Gaussian Hutchinson probes, a
score-threshold mode for TriAdaptLoRA), this file holds a *reference solution*, and the test
checks it against an independent computation, so CI runs the test and it can fail. A student's
solution is checked by the same test. Add it to curvature.py or adapters.py under the name the
exercise gives, and `solution()` below picks it up in place of the reference (or rewrite the
reference's body here). The merge test checks the project's own code for every method.

Everything is tiny (8-dimensional matrices, a 6-module toy network), so the whole file runs in
well under a second.
"""
import copy

import pytest
import torch
import torch.nn as nn

import adapter_config as AC
import adapters as A
import curvature as C


def solution(module, name: str, reference):
    """The student's `module.name` if it exists, else this file's reference solution."""
    return getattr(module, name, reference)


# --------------------------------------------------------------------------------------------------
# Exercise 2 (Hutchinson): Gaussian probes, and why Rademacher probes are the better choice
# --------------------------------------------------------------------------------------------------

def gaussian_like(params, generator=None):
    """Reference solution: independent N(0, 1) entries shaped like params (E[z zᵀ] = I, like
    Rademacher probes)."""
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            for p in params]


def probe_variance(H: torch.Tensor, kind: str) -> float:
    """Variance of one sample zᵀHz (H symmetric): Rademacher 2 Σ_{i≠j} H_ij², Gaussian 2 ‖H‖²_F
    (notes/curvature.md §12)."""
    off_diagonal = H - torch.diag(torch.diagonal(H))
    return (float(2 * (off_diagonal ** 2).sum()) if kind == "rademacher"
            else float(2 * (H ** 2).sum()))


def test_gaussian_and_rademacher_probes_have_the_predicted_variance():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 8, generator=g, dtype=torch.float64)
    # symmetric, indefinite, large diagonal
    H = X + X.T + torch.diag(torch.arange(8, dtype=torch.float64))
    n = 40_000
    draws = {"rademacher": C.rademacher_like,
             "gaussian": solution(C, "gaussian_like", gaussian_like)}
    variances = {}
    for kind, draw in draws.items():
        # (n, 8): n probes (all entries independent)
        Z = draw([torch.zeros(n, 8, dtype=torch.float64)], g)[0]
        samples = ((Z @ H) * Z).sum(1)                   # zᵀHz per probe
        second_moment = Z.T @ Z / n                      # E[z zᵀ] must be I for an unbiased trace
        assert torch.allclose(second_moment, torch.eye(8, dtype=torch.float64), atol=0.05), kind
        assert (abs(float(samples.mean()) - float(torch.trace(H)))
                < 4 * (probe_variance(H, kind) / n) ** 0.5), kind
        variances[kind] = float(samples.var())
        assert variances[kind] == pytest.approx(probe_variance(H, kind), rel=0.1), kind
    # the diagonal's contribution is what Rademacher probes save: here it is most of
    # the Gaussian variance
    assert variances["rademacher"] < 0.8 * variances["gaussian"]


def test_hessian_vector_products_see_the_same_quadratic_form():
    """The probes above go through a matrix; curvature.hessian_operator must give the same H z for
    L = ½ θᵀHθ."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 8, generator=g, dtype=torch.float64)
    H = X + X.T
    theta = torch.randn(8, generator=g, dtype=torch.float64)
    with C.hessian_operator(lambda: 0.5 * theta @ H @ theta, [theta]) as Hv:
        for z in (C.rademacher_like([theta], g)[0],
                  solution(C, "gaussian_like", gaussian_like)([theta], g)[0]):
            assert torch.allclose(Hv([z])[0], H @ z, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Exercise 4 (TriAdaptLoRA): a threshold on the scores themselves
# --------------------------------------------------------------------------------------------------

def score_threshold_choice(scores: list[float], progress: float, remaining: int,
                           block: int) -> list[int]:
    """Reference solution. Indices of the modules that grow at an event, best first, under the
    "score" threshold:

        ŝ_ℓ = (s_ℓ − min s)/(max s − min s)  (all 1 if the scores are equal);
        grow every ℓ with ŝ_ℓ ≥ 1 − p

    so at p = 0 only the best module grows and at p = 1 all do. Then the same clamp as growth_count:
    at least one module, at most ⌊R/k⌋, none if R < k (the budget is never overshot).
    """
    if remaining < block:
        return []
    lo, hi = min(scores), max(scores)
    normalized = [1.0 if hi == lo else (s - lo) / (hi - lo) for s in scores]
    n = sum(v >= 1.0 - progress for v in normalized)
    n = max(1, min(n, len(scores), remaining // block))
    return A.highest(scores, n)


@pytest.mark.parametrize("scores, progress, remaining, block, expected", [
    ([0.0, 0.1, 0.5, 0.9, 1.0], 0.0, 50, 1, [4]),                 # p = 0: only the best
    ([0.0, 0.1, 0.5, 0.9, 1.0], 0.5, 50, 1, [4, 3, 2]),           # ŝ ≥ 0.5
    ([0.0, 0.1, 0.5, 0.9, 1.0], 1.0, 50, 1, [4, 3, 2, 1, 0]),     # p = 1: everyone
    ([0.0, 0.1, 0.5, 0.9, 1.0], 1.0, 5, 2, [4, 3]),               # ⌊R/k⌋ = 2
    ([0.0, 0.1, 0.5, 0.9, 1.0], 1.0, 1, 2, []),                   # R < k: no growth
    # negative scores: normalized, not thresholded at 0
    ([-2.0, -1.0, 0.0], 0.5, 50, 1, [2, 1]),
    # all equal: all qualify, earlier first
    ([0.3, 0.3, 0.3], 0.0, 50, 1, [0, 1, 2]),
])
def test_score_threshold_choice_on_hand_computed_cases(scores, progress, remaining, block,
                                                        expected):
    choose = solution(A, "score_threshold_choice", score_threshold_choice)
    assert choose(scores, progress, remaining, block) == expected


class ScoreThresholdHooks(A.TriAdaptHooks):
    """Reference solution of the wiring: TriAdaptHooks whose growth events use
    score_threshold_choice."""

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = step + 1
        if not self.is_event(t):
            return []
        progress = min(1.0, max(0.0, (t - self.warmup) / (self.final - self.warmup)))
        names = list(self.layers)
        scores = [A.normalized_frobenius_norm(self.layers[n]) - self.nu_prev[n] for n in names]
        chosen = [names[i] for i in score_threshold_choice(scores, progress,
                                                           self.budget - self.total_rank(),
                                                           self.cfg.tri_block)]
        new_params = [p for n in chosen for p in self.layers[n].grow()]
        self.nu_prev = {n: A.normalized_frobenius_norm(m) for n, m in self.layers.items()}
        self.events.append({"step": step, "modules": chosen})
        return new_params


class Toy(nn.Module):
    """Three residual blocks of two linears each: six adaptable modules, no transformers needed."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 12),
                                                   "down": nn.Linear(12, 8)})
                                    for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.tanh(b["up"](x)))
        return x


def nu_explicit(layer: A.TriAdaptLinear) -> float:
    """ν = ‖L + U‖_F / N from the two triangular parts, independent of core() and
    normalized_frobenius_norm."""
    with torch.no_grad():
        return (float(torch.sqrt(((layer.lower() + layer.upper()).double() ** 2).sum()))
                / layer.num_blocks)


def test_score_threshold_mode_grows_what_the_rule_says_and_keeps_the_function():
    torch.manual_seed(0)
    model = Toy().double()
    student_mode = "score" in AC.THRESHOLD_MODES
    cfg = A.AdapterConfig(method="triadapt", r=4, tri_init_rank=2, targets=["up", "down"],
                          total_steps=20, tri_warmup=2, tri_interval=2, tri_final=12,
                          tri_threshold="score" if student_mode else "linear")
    A.apply_method(model, "triadapt", cfg)
    model.double()
    hooks = A.training_hooks(model, cfg) if student_mode else ScoreThresholdHooks(model, cfg)
    layers = list(hooks.layers.values())
    x = torch.randn(5, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    events_that_grew = 0
    for step in range(20):
        # a fake training step: cores and B move, by module
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for R in layer.tri_R:
                    R.add_(0.02 * (i + 1) * torch.randn(R.shape, generator=g, dtype=R.dtype))
                for Bb in layer.tri_B:
                    Bb.add_(0.1 * torch.randn(Bb.shape, generator=g, dtype=Bb.dtype))
        t = step + 1
        scores = [nu_explicit(m) - hooks.nu_prev[n] for n, m in hooks.layers.items()]
        ranks_before = [m.rank for m in layers]
        with torch.no_grad():
            before = model(x)
        hooks.after_optimizer_step(step)
        grown = [i for i, m in enumerate(layers) if m.rank > ranks_before[i]]
        events_that_grew += bool(grown)
        if hooks.is_event(t):
            p = (t - hooks.warmup) / (hooks.final - hooks.warmup)
            lo, hi = min(scores), max(scores)
            qualify = {i for i, s in enumerate(scores) if (s - lo) / (hi - lo) >= 1 - p - 1e-12}
            room = (hooks.budget - sum(ranks_before)) // cfg.tri_block
            if room == 0:
                assert grown == []
            elif len(qualify) <= room:
                assert set(grown) == qualify, (t, grown, qualify)
            else:                                     # too many qualify: the best `room` of them
                assert set(grown) == set(sorted(qualify, key=lambda i: -scores[i])[:room]), t
        else:
            assert grown == []
        with torch.no_grad():
            assert (model(x) - before).abs().max() <= 1e-12   # growth never changes the function
        assert hooks.total_rank() <= hooks.budget
    assert events_that_grew >= 3 and hooks.total_rank() > 12


# --------------------------------------------------------------------------------------------------
# Exercise 7 (merge / unmerge): exact for every method, against the method's own tensors
# multiplied out by hand
# --------------------------------------------------------------------------------------------------

def dense_delta(layer: A.AdaptedLinear) -> torch.Tensor:
    """ΔW (d_out, d_in) of each adapter type from its raw tensors (not lora_factors /
    delta_weight)."""
    if isinstance(layer, A.CGShiftLinear):
        return layer.scale * (layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0)
    if isinstance(layer, A.LoRALinear):
        return layer.scale * layer.lora_B @ layer.lora_A
    if isinstance(layer, A.SVDLinear):
        return (layer.scale * layer.lora_P @ torch.diag(layer.lora_lambda * layer.lora_mask)
                @ layer.lora_Q)
    if isinstance(layer, A.TriAdaptLinear):
        return layer.scale * layer.full_B() @ (layer.lower() + layer.upper()) @ layer.full_A()
    raise TypeError(type(layer))


@pytest.mark.parametrize("method, options", [
    ("lora", {}),
    ("adalora", {"init_rank": 6}),
    ("triadapt", {"tri_init_rank": 2}),
    ("cg", {"cg_variant": "shift"}),
])
def test_merge_then_unmerge_is_exact_for_every_method(method, options):
    torch.manual_seed(0)
    model = Toy()                                     # fp32: merging is done in fp32 by design
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules()
          if isinstance(m, nn.Linear)}
    cfg = A.AdapterConfig(method=method, r=4, targets=["up", "down"], **options)
    layers = A.apply_method(model, method, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            if isinstance(layer, A.TriAdaptLinear):
                for _ in range(i % 3):
                    layer.grow()                      # ranks 2, 3, 4: several block layouts
            for t in list(layer.parameters()) + list(layer.buffers()):
                if t is not layer.weight and t is not layer.bias and t.dtype.is_floating_point:
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
            if isinstance(layer, A.SVDLinear):
                # half the triplets masked
                layer.lora_mask.copy_((torch.arange(layer.r) % 2).to(layer.lora_mask))
                layer.apply_mask()
    x = torch.randn(5, 8)
    with torch.no_grad():
        unmerged = model(x)
        base = copy.deepcopy(model)
        A.remove_adapters(base)
        assert (unmerged - base(x)).abs().max() > 1e-2          # the adapters matter
        deltas = {n: dense_delta(m) for n, m in layers.items()}
    A.merge_adapters(model)
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.merged
            assert (layer.weight - (W0[name] + deltas[name])).abs().max() <= 1e-6, name
        assert (model(x) - unmerged).abs().max() <= 1e-5
    A.unmerge_adapters(model)
    with torch.no_grad():
        for name, layer in layers.items():
            assert (layer.weight - W0[name]).abs().max() <= 1e-6, name
        assert (model(x) - unmerged).abs().max() <= 1e-5
