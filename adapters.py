"""
Adapters for Llama linears: LoRA, AdaLoRA, TriAdaptLoRA, CTR-LoRA and CG-LoRA, one section each.

Every adapted layer replaces one frozen `nn.Linear` (y = W0 x, W0: d_out × d_in) and adds a
low-rank update ΔW:

        x ──────────────── W0 (frozen) ───────────────┐
        │                                             (+)──> y = W0 x + ΔW x
        └─ dropout ─> [the method's factors: ΔW x] ───┘      (ΔW is never formed)

Notation follows SPEC §2: S, Γ are the K-FAC input/output factors, c the LoRA scale. The layer owns
the frozen base weight as `self.weight` (as torchtune's LoRA linear does), so a base checkpoint key
such as `model.layers.0.self_attn.q_proj.weight` loads unchanged into an adapted model.

Read it top to bottom:
  1. Shared machinery: the fused adapted linear, small free functions, the hooks a training loop
     calls (MethodHooks), the orthogonality penalty, the rank budget schedule and mask allocator.
  2. LoRA           ΔW = (α/r) B A                          Hu et al. 2021 (stated)
  3. AdaLoRA        ΔW = (α/r₀) P diag(λ) Q, masked triplets  Zhang et al. 2023 (stated)
  4. TriAdaptLoRA   ΔW = (α/r_ref) B (L + U) A, grown        Liang et al. 2025 (our reconstruction)
  5. CTR-LoRA       SVD form + curvature ranks + trust region  arXiv 2510.15962 (our reconstruction)
  6. CG-LoRA        LoRA started at a curvature-whitened step  arXiv 2603.29824 (our reconstruction)
  7. Methods by name: apply_method(model, "triadapt", cfg), training_hooks(model, cfg).

A plain loop trains every method:

    apply_method(net, cfg.method, cfg); hooks = training_hooks(net, cfg)
    opt = torch.optim.AdamW(optimizer_parameters(net))
    for batch in batches:
        hooks.before_micro_batch(ids, labels, n_label_tokens)   # CTR-LoRA's statistics
        loss = net(...) + (hooks.regularizer() or 0); loss.backward()
        hooks.before_optimizer_step(opt, step); opt.step()
        new = hooks.after_optimizer_step(step)        # masks, trust region, growth
        opt.zero_grad()
        if new: opt.add_param_group({"params": new})  # TriAdaptLoRA's grown blocks

A loop that drops a step with a NaN/inf loss or gradient calls hooks.skip_step(step) in place of
everything after the backward (train.py does), so that nothing of that step stays behind.

Configuration lives in adapter_config.py, files (save, load, peft export) in adapter_io.py, the
second-order tools in curvature.py. dtype policy: adapter tensors are fp32 even when W0 is bf16.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import curvature as C
from adapter_config import (LLAMA_LINEAR_NAMES, METHOD_NAMES, SVD_INIT_STD,  # noqa: F401
                            AdapterConfig, check_budget_schedule, svd_ranks,
                            svd_schedule_steps, targeted_linears, triadapt_events,
                            triadapt_init_rank)

# ===============================================================================================
# 1. Shared machinery
# ===============================================================================================


class LowRankLinearFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + c · (x_a Aᵀ) Bᵀ as one autograd node, with the backward written out.

    The hot path of every adapted layer (ΔW = c B A; each method supplies A, B through
    forward_factors). Writing the gradients by hand shows LoRA's gradients explicitly. N tokens:

        forward    h = x_a Aᵀ                          (N×r)
                   y = addmm(x W0ᵀ + b, h, Bᵀ, α=c)    (N×d_out: the adapter rides in the base
                                                        GEMM's output, no N×d_out temporaries)
        backward   g = ∂L/∂y                           (N×d_out)
                   (∂h)ᵀ = c · Bᵀ gᵀ                   (r×N)
                   ∂B    = c · gᵀ h  = c (hᵀ g)ᵀ       (d_out×r)
                   ∂A    = (∂h)ᵀ x_a                   (r×d_in)
                   ∂x    = g W0 + ∂h A                 (with dropout, ∂x_a = ∂h A separately)
                   ∂W0   = gᵀ x,  ∂b = Σ g             (only when asked: CG-LoRA's calibration)

    The r-sized products are computed as Bᵀgᵀ and (hᵀg)ᵀ, the layouts MKL runs fastest here
    (notes/benchmarks.md). Same function and gradients as `AdaptedLinear.reference_forward` up to
    fp32 rounding (tests/test_adapters.py: dropout, bias, base-weight gradients, bf16 autocast).

    Inputs: x (..., d_in); x_a the adapter's input or None (= x, no dropout); weight, bias the
    frozen base; A (r, d_in), B (d_out, r); scale c; dtype the compute dtype (autocast's or x's):
    every operand is cast to it, and autograd casts each gradient back to its parameter's dtype.
    """

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, A, B, scale, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)                                 # (N, d_in)
        xa2 = x2 if x_a is None else x_a.reshape(-1, shape[-1]).to(dtype)       # (N, d_in)
        W, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
        h = torch.mm(xa2, A.t())                                                # (N, r)
        y = torch.mm(x2, W.t()) if bias is None else torch.addmm(bias.to(dtype), x2, W.t())
        y.addmm_(h, B.t(), alpha=scale)                                         # += c h Bᵀ
        need_x, need_xa, need_w, _, need_A, need_B = ctx.needs_input_grad[:6]
        ctx.save_for_backward(                                    # only what backward will use
            x2 if need_w or (need_A and x_a is None) else None,
            xa2 if need_A and x_a is not None else None,
            W if need_x else None, A if need_x or need_xa else None, B, h if need_B else None)
        ctx.scale, ctx.shape, ctx.has_bias = scale, shape, bias is not None
        ctx.dropout = x_a is not None
        return y.view(*shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # backward(create_graph=True): not differentiable again
            raise RuntimeError("a backward with create_graph=True (a Hessian-vector product?) "
                               "reached a fused adapter layer, which has no double backward: run "
                               "it inside curvature.twice_differentiable(model), or pass model=... "
                               "to curvature.hvp/hutchinson_*")
        x2, xa2, W, A, B, h = ctx.saved_tensors
        need_x, need_xa, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(B.dtype)                   # (N, d_out)
        x_in = xa2 if ctx.dropout else x2
        grad_x = grad_xa = grad_w = grad_b = grad_A = grad_B = None
        grad_hT = torch.mm(B.t(), g.t()).mul_(ctx.scale)                       # (r, N)
        if need_A:
            grad_A = torch.mm(grad_hT, x_in)                                   # (r, d_in)
        if need_B:
            grad_B = torch.mm(h.t(), g).mul_(ctx.scale).t().contiguous()       # (d_out, r)
        if need_x:
            grad_x = torch.mm(g, W)                                            # base path
            if not ctx.dropout:
                grad_x.addmm_(grad_hT.t(), A)                                  # + adapter path
            grad_x = grad_x.view(ctx.shape)
        if need_xa:
            grad_xa = torch.mm(grad_hT.t(), A).view(ctx.shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)                                       # (d_out, d_in)
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_xa, grad_w, grad_b, grad_A, grad_B, None, None


class AdaptedLinear(nn.Module):
    """A frozen linear `y = x W0ᵀ (+ b)` plus a trainable adapter ΔW: `y = x (W0 + ΔW)ᵀ (+ b)`.

    Owns the frozen base parameters as `weight` (d_out, d_in) and `bias`, exactly like
    `nn.Linear`. A method's subclass implements:

      adapter_forward(x)  ΔW x in plain ops, x in the adapter dtype: the readable definition
      lora_factors()      (A (r, d_in), B (d_out, r), c) with ΔW = c B A: used for export
      forward_factors()   the same as the forward uses them (default: lora_factors())

    Merging is explicit (merge()/unmerge(), never on eval()). `disabled` makes the forward the
    base linear alone (see `adapters_disabled`).
    """

    fused = True  # False: forward = reference_forward, which is twice differentiable

    def __init__(self, base: nn.Linear, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"can only adapt nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: weight tying survives
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False      # ΔW lives inside self.weight
        self.disabled = False    # forward is the base linear alone

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement adapter_forward(x)")

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement lora_factors()")

    def forward_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_factors()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = c B A in fp32 (d_out, d_in): for merging only, never in the forward."""
        A, B, scale = self.lora_factors()
        return scale * (B.float() @ A.float())

    @property
    def rank(self) -> int:
        """The shape rank r of the stored factors (what loading needs to rebuild them)."""
        return self.lora_factors()[0].shape[0]

    @property
    def active_rank(self) -> int:
        """Directions in use now: fewer than `rank` for a masked layer. For plots and logs."""
        return self.rank

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapter computes in: that of its first parameter (fp32 unless cast)."""
        for name, p in self._parameters.items():
            if name not in ("weight", "bias") and p is not None:
                return p.dtype
        for p in self.parameters():  # parameters held in ParameterLists (TriAdaptLoRA)
            if p is not self.weight and p is not self.bias:
                return p.dtype
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b + c B (A x): one fused node when the operands share a dtype or autocast is on
        (always, in train.py); otherwise (or with fused = False) reference_forward."""
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        if not self.fused:
            return self.reference_forward(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not (x.dtype == self.weight.dtype == self.adapter_dtype):
            return self.reference_forward(x)  # e.g. a bf16 base, fp32 adapters, no autocast
        A, B, scale = self.forward_factors()
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        x_a = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        return LowRankLinearFunction.apply(x, x_a, self.weight, self.bias, A, B, scale, dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in plain ops, the adapter in the adapter dtype."""
        y = F.linear(x, self.weight, self.bias)                        # (..., d_out)
        if self.merged or self.disabled:
            return y
        x_adapter = self.dropout(x.to(self.adapter_dtype))            # (..., d_in), fp32
        return y + self.adapter_forward(x_adapter).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + ΔW, in fp32, checked for NaN/inf before anything is written."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        merged = self.weight.float() + self.delta_weight().to(self.weight.device)
        if not torch.isfinite(merged).all():
            raise ValueError("merged weight has NaN/inf: the adapter is broken (check the loss "
                             "and learning rate)")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW: undoes merge up to rounding (bf16 rounding for a bf16 W0)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged; nothing to unmerge")
        base = self.weight.float() - self.delta_weight().to(self.weight.device)
        self.weight.copy_(base.to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, base_dtype={self.weight.dtype}, "
                f"merged={self.merged}")


# --- small free functions (loralib style) -----------------------------------------------------


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """{module name: adapted layer} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank in use now}. For logs and the rank heatmap."""
    return {name: layer.active_rank for name, layer in adapter_layers(model).items()}


def adapter_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{full name: parameter} of the adapter parameters (not the frozen base weight and bias)."""
    return {f"{name}.{pname}": p for name, layer in adapter_layers(model).items()
            for pname, p in layer.named_parameters() if pname not in ("weight", "bias")}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (parameters and buffers such as masks), keyed by full name, detached."""
    return {f"{name}.{key}": t.detach() for name, layer in adapter_layers(model).items()
            for key, t in layer.state_dict().items() if key not in ("weight", "bias")}


def optimizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an optimizer steps: every trainable parameter, tied ones once, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """requires_grad only for adapter parameters (not embeddings, norms, W0 or the head)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_named_parameters(model).values():
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "adapter"} parameter counts (tied tensors counted once)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "adapter": sum(p.numel() for p in adapter_named_parameters(model).values())}


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base weight; raises naming the first broken module."""
    for name, layer in adapter_layers(model).items():
        try:
            layer.merge()
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


@contextmanager
def adapters_disabled(layers: dict[str, AdaptedLinear]):
    """Run the given adapted layers as their base linears (the base model's predictions)."""
    before = {name: layer.disabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.disabled = True
        yield
    finally:
        for name, layer in layers.items():
            layer.disabled = before[name]


def remove_adapters(model: nn.Module) -> dict[str, nn.Linear]:
    """Put plain nn.Linear layers back, sharing the current weight tensors (a merged layer keeps
    its merged weight: this is 'merge and unload')."""
    restored = {}
    for name, layer in adapter_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight = layer.weight
        if layer.bias is not None:
            linear.bias = layer.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
        restored[name] = linear
    return restored


def rank_summary(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    return (f"rank per module min {min(values)}, mean {sum(values) / len(values):.1f}, "
            f"max {max(values)}")


# --- what a training loop calls ---------------------------------------------------------------


class MethodHooks:
    """What a method does around the optimizer step. This base class is plain LoRA: nothing.

    train.py calls, every step and in this order:
        per micro-batch    hooks.before_micro_batch(ids, labels, n_label); loss.backward()
                           (the last micro-batch's loss includes hooks.regularizer())
        clip; hooks.before_optimizer_step(optimizer, step); optimizer.step()
        new = hooks.after_optimizer_step(step); optimizer.zero_grad()    (.grad still readable)
        new parameters join the optimizer as a group of their own (TriAdaptLoRA's growth)
    or, for a step whose loss or gradient is NaN/inf, instead of everything after the backward:
        optimizer.zero_grad(); new = hooks.skip_step(step)
    and hooks.log_items() when logging, hooks.close() at the end. state_dict() and
    restore_structure() carry method state through checkpoints (plain types and tensors only: they
    are read back with weights_only=True).

    Under torchrun, train.py sets all_reduce_sum (sums a list of tensors over the ranks in place)
    and world_size; a method whose decisions use per-rank statistics reduces them with it, so that
    every rank decides the same. train.py also sets autocast (bf16 on CUDA) for the forwards a
    method runs itself (CTR-LoRA's KL check).
    """

    calibration_batches = 0  # > 0: train.py calls calibrate() with that many batches first
    all_reduce_sum: Callable[[list[torch.Tensor]], None] | None = None
    world_size = 1
    autocast = None          # the loop's autocast context, for forwards a method runs itself

    def __init__(self, model: nn.Module | None = None, cfg: AdapterConfig | None = None):
        self.model, self.cfg = model, cfg

    def calibrate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        return {}  # a data-dependent initialization (CG-LoRA); returns figures to log

    def before_micro_batch(self, input_ids, labels, n_label_tokens) -> None:
        pass  # curvature collectors (CTR-LoRA) learn which tokens carry a loss

    def regularizer(self) -> torch.Tensor | None:
        return None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        return []  # parameters created this step

    def skip_step(self, step: int) -> list[nn.Parameter]:
        """Step `step` is dropped (a NaN/inf loss or gradient) after its forward and backward.

        No value computed in it may reach the method's state: forget what before_micro_batch and
        the hooks collected (statistics, kept micro-batches, logits), and update no running
        average. The schedule keeps its clock: an event due at t = step + 1 (an allocation, a
        growth) happens, on the state of the last good step, or (CTR-LoRA's allocation, which
        its trust region must bound) waits for the next good step. Returns the parameters
        created, as after_optimizer_step. Plain LoRA and CG-LoRA keep nothing per step."""
        return []

    def log_items(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        """Rebuild what state_dict() saved, before weights and optimizer state load. Returns the
        parameter groups created mid-run as (params, start_step), in the order they joined."""
        return []

    def close(self) -> None:
        pass  # release what the method attached to the model


def orthogonality_penalty(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """AdaLoRA's orthogonality regularizer (Zhang et al. 2023, §3.1 eq. 4; stated), with
    unsquared Frobenius norms averaged over every factor matrix, as the official code and peft:

        R = 1/(2K) Σ_k ( ‖P_kᵀ P_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F ),   factors = [(P_k, Q_k)]

    SPEC §3 writes mean_k(‖PᵀP − I‖ + ‖QQᵀ − I‖) = 2R; we follow the official code so that γ
    (--orth-reg) means what peft's orth_reg_weight means. Factors of equal shapes are stacked, so
    each group (one per linear type in a Llama) is one batched matmul and norm.
    """
    groups: dict[tuple, list] = {}
    for P, Q in factors:
        groups.setdefault((tuple(P.shape), tuple(Q.shape)), []).append((P, Q))
    terms = []
    for pairs in groups.values():
        P = torch.stack([p for p, _ in pairs])                        # (n, d_out, r)
        Q = torch.stack([q for _, q in pairs])                        # (n, r, d_in)
        eye = torch.eye(P.shape[-1], device=P.device, dtype=P.dtype)
        terms.append(torch.linalg.matrix_norm(P.transpose(1, 2) @ P - eye))   # ‖PᵀP − I‖_F
        terms.append(torch.linalg.matrix_norm(Q @ Q.transpose(1, 2) - eye))   # ‖QQᵀ − I‖_F
    return torch.cat(terms).mean()


class BudgetSchedule:
    """The global budget b(t) of kept components and the steps that re-allocate it: AdaLoRA's
    schedule (Zhang et al. 2023, §3.3 eq. 12; stated), equal to peft's step for step:

        t ≤ t_i            b(t) = b₀                                       no allocation
        t_i < t ≤ T − t_f  b(t) = ⌊b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_i − t_f))³⌋
                                                                allocate when t % ΔT == 0
        t > T − t_f        b(t) = b_T                                      mask frozen

    t counts completed optimizer steps (1..T). shape="linear" uses the first power (ours, for
    ablations). Shared by AdaLoRA and CTR-LoRA.
    """

    def __init__(self, initial: int, target: int, total_steps: int, t_init: int, t_final: int,
                 delta_t: int, shape: str = "cubic"):
        check_budget_schedule(initial, target, total_steps, t_init, t_final, delta_t, shape)
        self.initial, self.target, self.total_steps = initial, target, total_steps
        self.t_init, self.t_final, self.delta_t, self.shape = t_init, t_final, delta_t, shape

    @classmethod
    def for_svd_layers(cls, cfg: AdapterConfig, n_modules: int) -> BudgetSchedule:
        """AdaLoRA's and CTR-LoRA's budget in triplets: r₀ → target rank per module."""
        if cfg.total_steps < 1:
            raise ValueError(f"{cfg.method}'s budget schedule needs the run's total optimizer "
                             f"steps: set total_steps (train.py sets it from --steps)")
        initial_rank, target_rank = svd_ranks(cfg)
        return cls(initial_rank * n_modules, target_rank * n_modules, cfg.total_steps,
                   *svd_schedule_steps(cfg), cfg.delta_t, cfg.budget_schedule)

    @property
    def freeze_step(self) -> int:
        """T − t_f: the last allocation (at b_T); the mask is frozen after it."""
        return self.total_steps - self.t_final

    def __call__(self, t: int) -> tuple[int, bool]:
        """(b(t), whether step t allocates): peft's (budget, mask_ind) for shape="cubic"."""
        if t <= self.t_init:
            return self.initial, False
        if t > self.freeze_step:
            return self.target, True
        progress = 1 - (t - self.t_init) / (self.total_steps - self.t_final - self.t_init)
        power = 3 if self.shape == "cubic" else 1
        budget = int((self.initial - self.target) * progress ** power + self.target)
        return budget, t % self.delta_t == 0


def keep_top_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """Global top-b: 0/1 masks (shaped like the scores) keeping the `budget` highest scores over
    all modules. Exactly `budget` are kept; ties go to the earlier module and index (peft masks
    `score ≤ k-th smallest`, which can keep fewer; with distinct scores the two agree)."""
    flat = torch.cat([s.flatten() for s in scores.values()])          # (Σ r_ℓ,)
    keep = torch.zeros_like(flat)
    keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = 1.0
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


class MaskAllocator:
    """Keeps SVD-form layers at the scheduled budget (SPEC §3, §5): at an allocation step, and
    once more at t = T − t_f, masks ← select(scores(), b(t)); then the masks are frozen. After every
    step the masked λ are set to 0 (under CTR-LoRA's trust region they decay to 0 as fast as its
    radius allows). The score is plugged in: AdaLoRA's sensitivity × uncertainty,
    or CTR-LoRA's marginal utility (with a hysteresis `select`)."""

    def __init__(self, layers: dict[str, SVDLinear], schedule: BudgetSchedule,
                 select: Callable[[dict, int], dict] = keep_top_budget):
        self.layers, self.schedule, self.select = layers, schedule, select

    def due(self, t: int) -> bool:
        """Is t an allocation step?"""
        allocate_now, freeze = self.schedule(t)[1], self.schedule.freeze_step
        return (allocate_now and t < freeze) or t == freeze

    @torch.no_grad()
    def step(self, t: int, scores: Callable[[], dict[str, torch.Tensor]],
             force: bool = False) -> bool:
        """Allocate if step t is an allocation step, or `force` (an allocation deferred from a
        dropped step); returns True then. Always zero masked λ."""
        budget = self.schedule(t)[0]
        allocate = force or self.due(t)
        if allocate:
            masks = self.select(scores(), budget)
            for name, layer in self.layers.items():
                layer.lora_mask.copy_(masks[name])
        for layer in self.layers.values():
            layer.apply_mask()
        return allocate


def check_same_total_steps(what: str, state: dict, cfg: AdapterConfig) -> None:
    """A schedule derived from T must not change on resume (train.py lets --steps change)."""
    saved = state.get("total_steps", cfg.total_steps)
    if saved != cfg.total_steps:
        raise ValueError(f"{what} was planned for --steps {saved}, not {cfg.total_steps}: resume "
                         f"with --steps {saved} (the ranks already allocated depend on it)")


# ===============================================================================================
# 2. LoRA (Hu et al. 2021, arXiv 2106.09685; every piece stated by the paper)
#    notes/lora_adalora.md
# ===============================================================================================


class LoRALinear(AdaptedLinear):
    """LoRA (Hu et al. 2021, §4.1, eq. 3):

        h = W0 x + ΔW x,   ΔW = c · B A,   c = α / r,   A ∈ R^{r×d_in},  B ∈ R^{d_out×r}

    A is Kaiming-uniform (bound 1/√d_in, as nn.Linear and peft), B = 0: the adapted model starts
    as the base model. The forward computes x → A x → B (A x) and never forms ΔW.

        x (.., d_in) ──A──> (.., r) ──B──> (.., d_out) ──× c──> ΔW x

    LoRA needs nothing around the optimizer step: its hooks are the no-op MethodHooks.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, dropout)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/√d_in, 1/√d_in)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_A)                        # (..., r)      A x
        return self.scale * F.linear(h, self.lora_B)        # (..., d_out)  c · B (A x)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    @property
    def rank(self) -> int:
        return self.r

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


# ===============================================================================================
# 3. AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
#    ICLR; every piece stated by the paper, written to equal peft's). notes/lora_adalora.md
#
#    ΔW = c · P diag(λ) Q          c = α / r₀; a triplet i is (P[:, i], λ_i, Q[i, :])
#    I = |θ ⊙ ∂L/∂θ|               sensitivity of every entry of P, λ, Q
#    Ī ← β₁ Ī + (1 − β₁) I         smoothed sensitivity
#    Ū ← β₂ Ū + (1 − β₂) |I − Ī|   uncertainty
#    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij),  s = Ī ⊙ Ū     triplet score
#    keep the global top-b(t) triplets (BudgetSchedule, MaskAllocator); penalty γ·R(P, Q)
# ===============================================================================================


class SVDLinear(AdaptedLinear):
    """AdaLoRA's SVD-form update (§3.1 eq. 3), shared with CTR-LoRA:

        ΔW = c · P diag(λ) Q,   P ∈ R^{d_out×r₀},  λ ∈ R^{r₀},  Q ∈ R^{r₀×d_in}

    λ = 0 at init (ΔW = 0); P, Q ~ N(0, 0.02²). The rank changes by masking: the 0/1 buffer
    `lora_mask` records which triplets are kept, and `apply_mask()` (after every optimizer step)
    sets masked λ_i to 0 (CTR-LoRA's trust region may scale that move back: they then decay to 0).
    The forward does not multiply by the mask, so ∂L/∂λ_i exists for masked triplets too
    (CTR-LoRA's utility of switching one back on needs it); shapes never change.

        x (.., d_in) ──Q──> (.., r₀) ──⊙λ──> (.., r₀) ──P──> (.., d_out) ──× c──> ΔW x
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 init_std: float = SVD_INIT_STD):
        super().__init__(base, dropout)
        if r < 1:
            raise ValueError(f"SVD-form adapter rank must be >= 1, got r={r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        d_in, d_out = self.in_features, self.out_features
        self.lora_P = nn.Parameter(torch.empty(d_out, r, device=device).normal_(0.0, init_std))
        self.lora_lambda = nn.Parameter(torch.zeros(r, device=device))
        self.lora_Q = nn.Parameter(torch.empty(r, d_in, device=device).normal_(0.0, init_std))
        self.register_buffer("lora_mask", torch.ones(r, device=device))  # 1 = kept

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_Q) * self.lora_lambda     # (..., r₀)     diag(λ) Q x
        return self.scale * F.linear(h, self.lora_P)        # (..., d_out)  c · P diag(λ) Q x

    def forward_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A = diag(λ) Q, B = P over every triplet (masked ones have λ = 0): no host sync."""
        return self.lora_lambda[:, None] * self.lora_Q, self.lora_P, self.scale

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ_i ← 0 for every masked triplet."""
        self.lora_lambda.mul_(self.lora_mask)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The triplets in use as LoRA: A = diag(λ) Q, B = P over the kept triplets and any masked
        one whose λ is not 0 yet (CTR-LoRA's trust region removes them gradually). A module with
        no such triplet exports one zero direction (peft's LoRA needs r ≥ 1)."""
        keep = self.lora_mask.bool() | (self.lora_lambda != 0)
        if not keep.any():
            return (self.lora_Q.new_zeros(1, self.in_features),
                    self.lora_P.new_zeros(self.out_features, 1), self.scale)
        return self.lora_lambda[keep, None] * self.lora_Q[keep], self.lora_P[:, keep], self.scale

    @property
    def rank(self) -> int:
        return self.r  # the shape rank r₀

    @property
    def active_rank(self) -> int:
        return int(self.lora_mask.sum().item())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r0={self.r}, active_rank={self.active_rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}")


class SensitivityScores:
    """AdaLoRA's importance of every entry (§3.2 eqs. 8–11; stated), as peft computes it:

        I = |θ ⊙ ∂L/∂θ|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s = Ī ⊙ Ū

    and the triplet score (eq. 7): S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij). update() runs
    after optimizer.step and before zero_grad (as peft's update_and_allocate). Under DDP the
    gradients are already all-reduced, so every rank computes the same scores.
    """

    def __init__(self, layers: dict[str, SVDLinear], beta1: float, beta2: float):
        self.layers, self.beta1, self.beta2 = layers, beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}  # "<module>.lora_P" -> Ī, shaped like the parameter
        self.unc: dict[str, torch.Tensor] = {}  # "<module>.lora_P" -> Ū

    def _named_params(self):
        for name, layer in self.layers.items():
            for pname in ("lora_P", "lora_lambda", "lora_Q"):
                yield f"{name}.{pname}", getattr(layer, pname)

    @torch.no_grad()
    def update(self) -> None:
        """The three lines above for every P, λ, Q at once (torch._foreach_* ops: one kernel per
        op, not one per tensor). lerp(a, b, w) = (1 − w) a + w b, so Ī ← lerp(Ī, I, 1 − β₁)."""
        named = [(key, p) for key, p in self._named_params() if p.grad is not None]
        if not named:
            return
        for key, p in named:
            if key not in self.avg:
                self.avg[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
        keys, params = [k for k, _ in named], [p for _, p in named]
        avg, unc = [self.avg[k] for k in keys], [self.unc[k] for k in keys]
        sensitivity = torch._foreach_mul(params, [p.grad for p in params])
        torch._foreach_abs_(sensitivity)                               # I = |θ ⊙ ∇θ|
        torch._foreach_lerp_(avg, sensitivity, 1 - self.beta1)          # Ī
        deviation = torch._foreach_sub(sensitivity, avg)
        torch._foreach_abs_(deviation)                                  # |I − Ī|
        torch._foreach_lerp_(unc, deviation, 1 - self.beta2)            # Ū

    def _score(self, key: str, p: torch.Tensor) -> torch.Tensor:
        return self.avg[key] * self.unc[key] if key in self.avg else torch.zeros_like(p)

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: S (r₀,)}."""
        out = {}
        for name, layer in self.layers.items():
            s_P = self._score(f"{name}.lora_P", layer.lora_P)              # (d_out, r₀)
            s_lambda = self._score(f"{name}.lora_lambda", layer.lora_lambda)
            s_Q = self._score(f"{name}.lora_Q", layer.lora_Q)              # (r₀, d_in)
            out[name] = s_lambda + s_P.mean(dim=0) + s_Q.mean(dim=1)
        return out

    def reset(self) -> None:
        self.avg, self.unc = {}, {}

    def state_dict(self) -> dict:
        return {"avg": dict(self.avg), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        self.avg, self.unc = dict(state.get("avg", {})), dict(state.get("unc", {}))


def svd_layers(model: nn.Module, method: str) -> dict[str, SVDLinear]:
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, SVDLinear)}
    if not layers:
        raise ValueError(f"{method} hooks need SVD-form adapters: call "
                         f"apply_method(model, {method!r}, cfg) first")
    return layers


class AdaLoRAHooks(MethodHooks):
    """AdaLoRA around the optimizer step:

        regularizer()            γ · R(P, Q)                              (orthogonality_penalty)
        after_optimizer_step(t)  t < T − t_f: update the scores           (SensitivityScores)
                                 allocation steps: keep the top-b(t) triplets, mask the rest
                                 every step: masked λ ← 0                 (MaskAllocator)
        skip_step(t)             a dropped step: the allocation only, on the scores so far

    t = step + 1 counts completed steps, so the t_f frozen steps are the run's last t_f.
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.layers = svd_layers(model, "adalora")
        self.schedule = BudgetSchedule.for_svd_layers(cfg, len(self.layers))
        self.scores = SensitivityScores(self.layers, cfg.beta1, cfg.beta2)
        self.allocator = MaskAllocator(self.layers, self.schedule)
        self.budget = self.schedule.initial
        self._unlogged_ranks: dict[str, int] | None = None  # the last allocation, for log_items

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        pairs = [(m.lora_P, m.lora_Q) for m in self.layers.values()]
        return self.cfg.orth_reg * orthogonality_penalty(pairs)

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = step + 1
        if t < self.schedule.freeze_step:
            self.scores.update()
        self._allocate(t)
        return []

    def skip_step(self, step: int) -> list[nn.Parameter]:
        """The scores skip the dropped step (its gradients are gone); an allocation due now still
        happens on the scores so far, so the mask still reaches b_T at t = T − t_f."""
        self._allocate(step + 1)
        return []

    def _allocate(self, t: int) -> None:
        self.budget = self.schedule(t)[0]
        if self.allocator.step(t, self.scores.triplet_scores):
            ranks = {name: m.active_rank for name, m in self.layers.items()}
            self._unlogged_ranks = ranks
            frozen = t == self.schedule.freeze_step
            print(f"adalora step {t}/{self.schedule.total_steps}: kept {sum(ranks.values())} of "
                  f"{self.schedule.initial} triplets (budget {self.budget}); "
                  f"{rank_summary(ranks)}{'; mask frozen from here on' if frozen else ''}",
                  file=sys.stderr)
            if frozen:
                self.scores.reset()  # no longer needed (peft frees them too)

    def log_items(self) -> dict:
        items = {"total_rank": sum(m.active_rank for m in self.layers.values()),
                 "budget": self.budget}
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"scores": self.scores.state_dict(), "budget": self.budget,
                "total_steps": self.cfg.total_steps}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        check_same_total_steps("AdaLoRA's budget schedule", state, self.cfg)
        self.scores.load_state_dict(state.get("scores", {}))
        self.budget = state.get("budget", self.budget)
        return []  # masks are buffers in the adapter weights; shapes never change


# ===============================================================================================
# 4. TriAdaptLoRA (Liang, Wang, Zeng 2025, arXiv 2501.08008). notes/triadapt_lora.md
#
#    Stated by the paper: a triangular split of the transformation matrix into lower and upper
#    triangular parts; importance from normalized Frobenius norms; rank growth under dynamic
#    thresholds (linear threshold growth works best). The paper's method section was not
#    available: the block layout, initialization and rules below are this project's
#    reconstruction (SPEC §4), built from the public peft-fork code with its bugs fixed.
#
#    ΔW = c · B C A,  c = α / r_ref (fixed),  C = L + U (block lower + strictly block upper)
#    ν_ℓ = ‖C_ℓ‖_F / N_ℓ                 importance of module ℓ with N_ℓ blocks
#    s_ℓ = ν_ℓ − ν_ℓ^prev                score: the rise since the last event
#    n = ⌊R·p⌋ (linear) | ⌊R^p⌋ (exponential) | top_k (fixed),  clamp(n, 1, min(#modules, ⌊R/k⌋))
#    the n highest s_ℓ grow by a block of k;  R = b_T − Σ r_ℓ,  p = (t − T_w)/(T_final − T_w)
# ===============================================================================================


class TriAdaptLinear(AdaptedLinear):
    """TriAdaptLoRA's layer: A and B are lists of blocks, and the core C is built from strips.

    Growth event n (block size k, rank r_{n-1} → r_n = r_{n-1} + k) appends four parameters:

        a_n (k×d_in) ~ N(0, σ²)     tri_A[n]     new rows of A
        b_n (d_out×k) = 0           tri_B[n]     new columns of B
        R_n (k×r_n)  = [0 | I_k]    tri_R[n]     new block-row of L, its diagonal block included
        K_n (r_{n-1}×k) = 0         tri_K[n-1]   new block-column of U, above the diagonal

    Old entries never move. With b_n = 0 and K_n = 0 the function is unchanged at growth, and
    every new tensor gets a gradient within two steps (b_n and K_n at once; a_n and R_n once
    b_n ≠ 0). The first block is A ~ N(0, σ²), C = R_0 = I, B = 0. (The public code starts B and
    C at zero, so nothing ever trains, and rescales by 1/r, a jump at every growth.)

        x (.., d_in) ──A──> (.., r) ──C──> (.., r) ──B──> (.., d_out) ──× c──> ΔW x

        C = L + U after two growths:     ┌ r_0 ┬  k  ┬  k  ┐
                                     r_0 │ R_0 │ K_1 │ K_2 │
                                         ├─────┘     │     │
                                      k  │   R_1     │     │
                                         ├───────────┘     │
                                      k  │      R_2        │
                                         └─────────────────┘

    Each block is a parameter of its own, so a plain `loss.backward(); opt.step()` trains every
    one, and each growth event's blocks can join the optimizer as a group with fresh state and
    warm-up (SPEC §4). The forward concatenates them: a few small copies per module and step.
    """

    def __init__(self, base: nn.Linear, r_ref: int, alpha: float, init_rank: int, block: int,
                 dropout: float = 0.0, init_std: float = SVD_INIT_STD, rank: int | None = None):
        super().__init__(base, dropout)
        if min(init_rank, block, r_ref) < 1:
            raise ValueError(f"TriAdaptLoRA needs init_rank, block and r_ref >= 1, got "
                             f"{init_rank}, {block}, {r_ref}")
        self.r_ref, self.alpha, self.scale = r_ref, alpha, alpha / r_ref
        self.init_rank, self.block, self.init_std = init_rank, block, init_std
        device = base.weight.device
        a_0 = torch.empty(init_rank, self.in_features, device=device).normal_(0.0, init_std)
        self.tri_A = nn.ParameterList([a_0])                                          # a_0, a_1, …
        self.tri_B = nn.ParameterList([torch.zeros(self.out_features, init_rank, device=device)])
        self.tri_R = nn.ParameterList([torch.eye(init_rank, device=device)])         # R_0 = I
        self.tri_K = nn.ParameterList()                                               # K_1, K_2, …
        if rank is not None:  # rebuild a grown structure (loading a saved adapter)
            self.grow_to(rank)

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.tri_A)

    @property
    def num_blocks(self) -> int:
        return len(self.tri_A)

    def grow(self) -> list[nn.Parameter]:
        """A growth event: append a_n, b_n, R_n, K_n (ΔW unchanged); returns them in that order."""
        k, r_prev, like = self.block, self.rank, self.tri_A[0]
        with torch.no_grad():
            a = like.new_empty(k, self.in_features).normal_(0.0, self.init_std)       # (k, d_in)
            b = like.new_zeros(self.out_features, k)                                  # (d_out, k)
            R = torch.cat([like.new_zeros(k, r_prev), torch.eye(k, device=like.device,
                                                                dtype=like.dtype)], dim=1)
            K = like.new_zeros(r_prev, k)                                             # (r_{n-1}, k)
        new = [nn.Parameter(t, requires_grad=like.requires_grad) for t in (a, b, R, K)]
        for blocks, p in zip((self.tri_A, self.tri_B, self.tri_R, self.tri_K), new):
            blocks.append(p)
        return new

    def grow_to(self, rank: int) -> list[nn.Parameter]:
        """Grow until the rank is `rank` (= init_rank + n·block); returns the new parameters."""
        if rank < self.rank or (rank - self.init_rank) % self.block:
            raise ValueError(f"TriAdaptLoRA rank {rank} is not reachable from rank {self.rank} in "
                             f"blocks of {self.block} (tri_init_rank {self.init_rank})")
        new = []
        while self.rank < rank:
            new += self.grow()
        return new

    def full_A(self) -> torch.Tensor:
        """A (r, d_in): the blocks' rows stacked (the parameter itself before any growth)."""
        return self.tri_A[0] if self.num_blocks == 1 else torch.cat(list(self.tri_A))

    def full_B(self) -> torch.Tensor:
        """B (d_out, r): the blocks' columns side by side."""
        return self.tri_B[0] if self.num_blocks == 1 else torch.cat(list(self.tri_B), dim=1)

    def lower(self) -> torch.Tensor:
        """L (r×r): block-row n is R_n, zeros right of its diagonal block."""
        r = self.rank
        return torch.cat([F.pad(R, (0, r - R.shape[1])) for R in self.tri_R])

    def upper(self) -> torch.Tensor:
        """U (r×r): block-column n ≥ 1 is K_n above the diagonal; block-column 0 is zero."""
        r = self.rank
        first = self.tri_R[0].new_zeros(r, self.init_rank)
        return torch.cat([first] + [F.pad(K, (0, 0, 0, r - K.shape[0])) for K in self.tri_K],
                         dim=1)

    def core(self) -> torch.Tensor:
        """C = L + U (r×r). The strips tile C exactly once: r² free entries."""
        return self.tri_R[0] if self.num_blocks == 1 else self.lower() + self.upper()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.full_A())                       # (..., r)      A x
        z = F.linear(h, self.core())                         # (..., r)      C A x
        return self.scale * F.linear(z, self.full_B())       # (..., d_out)  c · B C A x

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Plain LoRA form: A' = A, B' = B C, c = α/r_ref (SPEC §4)."""
        return self.full_A(), self.full_B() @ self.core(), self.scale

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, blocks={self.num_blocks}, "
                f"r_ref={self.r_ref}, alpha={self.alpha:g}, scale={self.scale:g}")


@torch.no_grad()
def normalized_frobenius_norm(layer: TriAdaptLinear) -> float:
    """ν_ℓ = ‖C_ℓ‖_F / N_ℓ (the paper states normalized Frobenius norms; normalizing by the block
    count is ours). No gradients and no per-entry buffers: this is why it is cheap."""
    return (torch.linalg.matrix_norm(layer.core()) / layer.num_blocks).item()


def growth_count(mode: str, remaining: int, progress: float, n_modules: int, block: int,
                 top_k: int = 1) -> int:
    """How many modules grow at an event (the rules are ours). R = remaining budget in ranks,
    p = progress in [0, 1]:

        linear: n = ⌊R·p⌋      exponential: n = ⌊R^p⌋      fixed: n = top_k (IncreLoRA-style)
        n = clamp(n, 1, min(#modules, ⌊R/k⌋)),  and 0 when R < k: b_T is never overshot.
    """
    if remaining < block:
        return 0
    if mode == "linear":
        n = math.floor(remaining * progress)
    elif mode == "exponential":
        n = math.floor(remaining ** progress)
    elif mode == "fixed":
        n = top_k
    else:
        raise ValueError(f"--tri-threshold must be linear, exponential or fixed, got {mode!r}")
    return max(1, min(n, n_modules, remaining // block))


def highest(scores: list[float], n: int) -> list[int]:
    """Indices of the n highest scores, best first; ties go to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


class TriAdaptHooks(MethodHooks):
    """TriAdaptLoRA around the optimizer step:

        regularizer()            γ · R(B, A) on each module's whole B and A  (ours; SPEC §4)
        after_optimizer_step(t)  at t = T_w, T_w + interval, … ≤ T_final:
                                   s_ℓ = ν_ℓ − ν_ℓ^prev, n = growth_count(…)
                                   the n highest s_ℓ grow by k; ν^prev ← ν (after growth)
                                   returns the new blocks: they join the optimizer as a group
        skip_step(t)             a dropped step: the same (growth reads only the weights)

    Budget b_T = r_ref × #modules. A group born at step s starts its warm-up at s + 1.
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.layers = {n: m for n, m in adapter_layers(model).items()
                       if isinstance(m, TriAdaptLinear)}
        if not self.layers:
            raise ValueError("TriAdaptLoRA hooks need TriAdaptLoRA adapters: call "
                             "apply_method(model, 'triadapt', cfg) first")
        self.warmup, self.interval, self.final = triadapt_events(cfg)
        self.budget = cfg.r * len(self.layers)
        self.nu_prev = {name: normalized_frobenius_norm(m) for name, m in self.layers.items()}
        self.events: list[dict] = []  # [{"step", "modules": names grown}]: the grown structure
        self._unlogged_ranks: dict[str, int] | None = None
        self._not_yet_stepped: list[nn.Parameter] = []  # grown blocks the optimizer must receive

    def total_rank(self) -> int:
        return sum(m.rank for m in self.layers.values())

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        pairs = [(m.full_B(), m.full_A()) for m in self.layers.values()]
        return self.cfg.orth_reg * orthogonality_penalty(pairs)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Fail loudly if the blocks grown last step never joined the optimizer."""
        if self._not_yet_stepped:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(p) not in stepped for p in self._not_yet_stepped):
                raise RuntimeError("TriAdaptLoRA grew new blocks that are not in the optimizer: "
                                   "add what after_optimizer_step returns with "
                                   "optimizer.add_param_group({'params': new})")
            self._not_yet_stepped = []

    def is_event(self, t: int) -> bool:
        return self.warmup <= t <= self.final and (t - self.warmup) % self.interval == 0

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = step + 1
        if not self.is_event(t):
            return []
        remaining = self.budget - self.total_rank()                                   # R
        progress = min(1.0, max(0.0, (t - self.warmup) / (self.final - self.warmup)))  # p
        n = growth_count(self.cfg.tri_threshold, remaining, progress, len(self.layers),
                         self.cfg.tri_block, self.cfg.tri_top_k)
        if n == 0:
            return []
        names = list(self.layers)
        scores = [normalized_frobenius_norm(self.layers[name]) - self.nu_prev[name]
                  for name in names]                                                  # s_ℓ
        chosen = [names[i] for i in highest(scores, n)]
        new = [p for name in chosen for p in self.layers[name].grow()]
        self.nu_prev = {name: normalized_frobenius_norm(m) for name, m in self.layers.items()}
        self.events.append({"step": step, "modules": chosen})
        self._unlogged_ranks = {name: m.rank for name, m in self.layers.items()}
        self._not_yet_stepped = new
        print(f"triadapt step {t}/{self.cfg.total_steps or '?'}: {n} module(s) grew by "
              f"{self.cfg.tri_block} ({self.cfg.tri_threshold} threshold, progress "
              f"{progress:.2f}); total rank {self.total_rank()} of budget {self.budget}; "
              f"{rank_summary(self._unlogged_ranks)}", file=sys.stderr)
        return new

    def skip_step(self, step: int) -> list[nn.Parameter]:
        """Growth reads only the weights, which a dropped step left alone: an event due now
        happens as on any step (a growth event lost to a bad step would leave budget unused)."""
        return self.after_optimizer_step(step)

    def log_items(self) -> dict:
        items = {"total_rank": self.total_rank(), "budget": self.budget}
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"events": [dict(e) for e in self.events], "nu_prev": dict(self.nu_prev),
                "total_steps": self.cfg.total_steps}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        """Replay the saved growth events on freshly built adapters (the checkpoint's weights and
        optimizer state load into the new blocks next). Returns [(params, start_step)]."""
        check_same_total_steps("TriAdaptLoRA's growth schedule", state, self.cfg)
        if "storage" in state:  # written while the blocks were windows into whole tensors
            raise ValueError("this TriAdaptLoRA checkpoint stores its blocks as windows of whole "
                             "factors, whose optimizer state does not fit one parameter per "
                             "block: start again with --overwrite")
        groups = []
        for event in state.get("events", []):
            unknown = [name for name in event["modules"] if name not in self.layers]
            if unknown:
                raise ValueError(f"checkpoint grows module(s) {unknown[:3]} that this model does "
                                 f"not adapt")
            new = [p for name in event["modules"] for p in self.layers[name].grow()]
            groups.append((new, event["step"] + 1))
        self.events = [dict(e) for e in state.get("events", [])]
        self.nu_prev = dict(state.get("nu_prev", self.nu_prev))
        return groups


# ===============================================================================================
# 5. CTR-LoRA (arXiv 2510.15962, ICASSP 2026). notes/ctr_lora.md
#
#    Stated by the paper: rank scheduling by marginal utility from lightweight second-order
#    proxies; updates constrained by a Fisher/Hessian-metric trust region. The method section was
#    not available: the equations below are this project's formulation (SPEC §5).
#
#    ΔW = c · P diag(λ) Q                     AdaLoRA's SVD form (ranks change by masking)
#    s, γ, S̃ = mean h hᵀ (h = Q x), Γ̃ = mean u uᵀ (u = Pᵀ ĝ)   K-FAC statistics over every
#                                              position up to the last label (running average β)
#    H_i = c² Γ̃_ii S̃_ii                      Gauss-Newton curvature along λ_i
#    u_i = |½ H_i λ_i² − g_i λ_i| (active),  g_i² / (2H_i + ε) (masked)   marginal utility
#    keep the b(t) triplets of highest u_i (budget and utility both per triplet), hysteresis 1 + η
#    trust region: every applied step has measured KL(p_before ‖ p_after) ≤ ρ, in nats per label
#    token of the step's batch. κ = c_cal · ½ Σ_ℓ (n/N) tr(Γ_ℓ δW_ℓ S_ℓ δW_ℓᵀ) proposes the shrink
#    a·δθ; a no-grad forward measures the KL; a ← a·√(0.9ρ/KL) until KL ≤ ρ (a = 0 at worst).
#    c_cal = exp(running average, weight 0.3, of log(measured / uncalibrated κ)): this proxy alone
#    under-predicts AdamW steps on SmolLM2 by 4.2× (median; 0.65–60×, notes/curvature.md §10b).
# ===============================================================================================


def gauss_newton_curvature(S_r: torch.Tensor, Gamma_r: torch.Tensor, scale: float) -> torch.Tensor:
    """H_i = c² · Γ̃_ii · S̃_ii (r₀,): the K-FAC Gauss-Newton curvature of the loss along λ_i.

    One unit of λ_i moves ΔW by c·p_i q_iᵀ, whose metric norm is c²(p_iᵀ Γ p_i)(q_iᵀ S q_i); with
    the projected factors Γ̃ = Pᵀ Γ P and S̃ = Q S Qᵀ those are their diagonals.
    """
    return scale ** 2 * torch.diagonal(Gamma_r) * torch.diagonal(S_r)


def marginal_utility(lam: torch.Tensor, g: torch.Tensor, H: torch.Tensor, active: torch.Tensor,
                     eps: float = 1e-12) -> torch.Tensor:
    """Second-order marginal utility of each triplet, from L(λ_i + δ) ≈ L + g_i δ + ½ H_i δ²:

        active i:  u_i = | ½ H_i λ_i² − g_i λ_i |   loss increase if removed (δ = −λ_i; OBD)
        masked i:  u_i = g_i² / (2 H_i + ε)         loss decrease of a Newton step switching it on
    """
    remove = (0.5 * H * lam ** 2 - g * lam).abs()
    add = g ** 2 / (2 * H + eps)
    return torch.where(active, remove, add)


def select_with_hysteresis(scores: dict[str, torch.Tensor], budget: int,
                           active: dict[str, torch.Tensor], eta: float) -> dict[str, torch.Tensor]:
    """Global top-b(t) where a masked component displaces an active one only if its score is
    higher by a factor 1 + η: active scores are multiplied by 1 + η before the selection."""
    boosted = {n: s * torch.where(active[n], 1.0 + eta, 1.0) for n, s in scores.items()}
    return keep_top_budget(boosted, budget)


class CTRLoRAHooks(MethodHooks):
    """CTR-LoRA around the optimizer step (each part switchable for ablations):

        before_micro_batch     statistics on for this step (every --ctr-refresh steps); keep the
                               micro-batch and its logits (the training forward's) as p_before
        regularizer()          γ · R(P, Q)                                         (as AdaLoRA)
        before_optimizer_step  fold the statistics into their running average; EMA of ∂L/∂λ;
                               snapshot (P, λ, Q)                            [curvature proxy]
        after_optimizer_step   allocation steps: keep the top-b(t) triplets by utility
                                                                             [rank scheduler]
                               then δθ = AdamW's step and the masking; shrink it until its
                               measured KL ≤ ρ                                [trust region]
        skip_step              a dropped step: forget its statistics, micro-batches, logits
                               and snapshot; an allocation due now waits for the next good
                               step, whose trust region bounds it

    Statistics are collected inside training steps only: a forward or backward between steps
    (evaluation, generation) adds nothing. State per module (kfac-diag): s (d_in), γ (d_out),
    S̃ and Γ̃ (r₀×r₀), EMA of ∂L/∂λ (r₀): no d×d matrix at any scale.
    """

    max_forwards = 6             # check forwards per step; the step is dropped if none passes

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.layers = svd_layers(model, "ctr")
        self.schedule = None
        if cfg.ctr_schedule:
            self.schedule = BudgetSchedule.for_svd_layers(cfg, len(self.layers))
            self.allocator = MaskAllocator(self.layers, self.schedule, select=self._select)
        self.budget = sum(m.active_rank for m in self.layers.values())
        self.collector = None                            # the hessian metric needs no K-FAC
        if cfg.ctr_metric != "hessian":
            stats = ["diag", "projected"] + (["full"] if cfg.ctr_metric == "kfac-full" else [])
            # h = Q x and u = Pᵀ ĝ: the SVD form without diag(λ), so H_i exists when λ_i = 0
            self.collector = C.KFACCollector(self.layers, stats,
                                             projection=lambda m: (m.lora_Q, m.lora_P))
            self.collector.__enter__()                   # hooks stay for the run; close() removes
            self.collector.pause()                       # they collect inside training steps only
        self.curvature: dict[str, dict[str, torch.Tensor]] = {}  # EMA statistics per module
        self.grad_lambda: dict[str, torch.Tensor] = {}           # EMA of ∂L/∂λ per module
        self.hessian_diag: dict[str, list[torch.Tensor]] = {}    # hessian: diag H of (P, λ, Q)
        self.log_ratio = 0.0                # running mean of log(measured KL / proxy κ)
        self._micro: list = []              # this step's [ids, labels, logits before the step]
        self._rows = self._labels = 0       # this step's statistics rows and label tokens
        self._capture = None
        if cfg.ctr_trust_region:
            if not hasattr(model, "label_logits"):
                raise ValueError("CTR-LoRA's trust region measures the KL with model.py's "
                                 "Llama.label_logits; use model.load_pretrained, or "
                                 "ctr_trust_region=False")
            self._capture = model.lm_head.register_forward_hook(self._keep_logits)
        self._snapshot: dict[str, tuple[torch.Tensor, ...]] | None = None
        self.t = 0                                       # completed optimizer steps
        self._log = {"kappa": 0.0, "kl": 0.0, "shrink": 1.0, "kl_max": 0.0}
        self.steps_seen = self.steps_clipped = self.forwards = 0
        self._unlogged_ranks: dict[str, int] | None = None
        self.allocation_due = False          # an allocation deferred from a dropped step

    def close(self):
        if self.collector is not None:
            self.collector.__exit__(None, None, None)
        if self._capture is not None:
            self._capture.remove()

    @staticmethod
    def _params(layer: SVDLinear) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return layer.lora_P, layer.lora_lambda, layer.lora_Q

    # --- the curvature proxy ------------------------------------------------------------------
    def _collecting(self) -> bool:
        return self.t % self.cfg.ctr_refresh == 0 or not (self.curvature or self.hessian_diag)

    def before_micro_batch(self, input_ids, labels, n_label_tokens) -> None:
        if not self._micro:                              # the step's first micro-batch
            self._rows = self._labels = 0
        rows = C.positions_up_to_last_label(labels)      # every position that carries gradient
        self._rows += int(rows.sum())
        self._labels += int((labels != -100).sum())
        if self.collector is not None and self._collecting():
            # the loop's loss is Σ CE / n_label_tokens: per-token ĝ = n_label_tokens · ∂L/∂y
            self.collector.set_batch(rows, reduction="mean", n_loss_tokens=n_label_tokens)
        self._micro.append([input_ids, labels, None])

    def _keep_logits(self, module, inputs, output) -> None:
        """The training forward's (N, vocab) label logits: p_before of the trust region. With
        dropout they are noisy, and before_optimizer_step recomputes them in eval mode."""
        if self._micro and self._micro[-1][2] is None and torch.is_grad_enabled():
            self._micro[-1][2] = output.detach().float()

    @torch.no_grad()
    def _label_logits(self, ids, labels) -> torch.Tensor:
        """(N, vocab) fp32 logits at the label positions, eval mode, the loop's autocast."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast or nullcontext():
                return self.model.label_logits(ids, labels != -100).float()
        finally:
            self.model.train(was_training)

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        pairs = [(m.lora_P, m.lora_Q) for m in self.layers.values()]
        return self.cfg.orth_reg * orthogonality_penalty(pairs)

    @torch.no_grad()
    def _fold_statistics(self) -> None:
        """Running average (β) of the step's K-FAC statistics; rows/labels converts their means
        into the mean over label tokens that the KL is."""
        counts = torch.tensor([float(self._rows), float(self._labels)])
        if self.all_reduce_sum is not None:              # DDP: the statistics of the global batch
            self.collector.all_reduce(self.all_reduce_sum)
            self.all_reduce_sum([counts])
        rows_per_label = counts[0] / counts[1].clamp_min(1.0)
        new = {name: {**f.tensors(), "rows_per_label": rows_per_label}
               for name, f in self.collector.factors().items()}
        self.curvature = C.ema_update(self.curvature, new, self.cfg.ctr_beta)

    def _refresh_hessian(self) -> None:
        """Hutchinson estimate of diag H of every (P, λ, Q) on the step's first micro-batch."""
        ids, labels, _ = self._micro[0]
        params = [p for layer in self.layers.values() for p in self._params(layer)]
        with torch.enable_grad():
            diag = C.hutchinson_diagonal(lambda: self.model(ids, labels=labels), params,
                                         n_samples=self.cfg.ctr_probes, model=self.model)
        if self.all_reduce_sum is not None:              # DDP: the mean of every rank's estimate
            self.all_reduce_sum(diag)
            diag = [d / self.world_size for d in diag]
        new = {name: [d.clamp(min=0) for d in diag[3 * i:3 * i + 3]]   # a metric must be PSD
               for i, name in enumerate(self.layers)}
        self.hessian_diag = C.ema_update(self.hessian_diag, new, self.cfg.ctr_beta)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._collecting():
            if self.collector is not None:
                self._fold_statistics()
            elif self._micro:
                self._refresh_hessian()
        if self.collector is not None:
            self.collector.reset()
            self.collector.pause()                       # nothing more until the next step
        with torch.no_grad():
            grads = {n: m.lora_lambda.grad.detach().float().clone()
                     for n, m in self.layers.items() if m.lora_lambda.grad is not None}
            self.grad_lambda.update(C.ema_update(self.grad_lambda, grads, self.cfg.ctr_beta))
            self._snapshot = {n: tuple(p.detach().clone() for p in self._params(m))
                              for n, m in self.layers.items()}
        if self.cfg.ctr_trust_region:
            for micro in self._micro:                    # p_before in eval mode, if not captured
                if micro[2] is None or self.cfg.dropout > 0:
                    micro[2] = self._label_logits(micro[0], micro[1])

    # --- the trust region ---------------------------------------------------------------------
    @torch.no_grad()
    def step_metric(self, name: str, old: tuple, delta: tuple) -> torch.Tensor:
        """(n/N) tr(Γ δW S δWᵀ) of one module's step (Σ_p h_p δp² with the Hessian metric).

        δW is the exact change c(B′A′ − BA) of the SVD form, c(δB·A′ + B·δA) with B = P diag(λ),
        δB = B′ − B, A′ = Q′, δA = Q′ − Q: three r×r trace terms (curvature.
        low_rank_metric_norm_sq). Not first order on purpose: at init λ = 0, so to first order
        only P diag(δλ) Q moves, while AdamW moves every entry of P and Q by about the lr.
        """
        if self.cfg.ctr_metric == "hessian":
            return sum((h * d.float() ** 2).sum() for h, d in zip(self.hessian_diag[name], delta))
        (P, lam, Q), (dP, dlam, dQ) = old, delta
        B = P * lam                                                  # (d_out, r₀)  P diag(λ)
        dB = (P + dP) * (lam + dlam) - B                             # (d_out, r₀)  B′ − B
        f = self.curvature[name]
        full = self.cfg.ctr_metric == "kfac-full"
        S, Gamma = (f["S"], f["Gamma"]) if full else (f["s"], f["gamma"])
        scale = self.layers[name].scale
        return f["rows_per_label"] * C.low_rank_metric_norm_sq(B, Q + dQ, dB, dQ, S, Gamma, scale)

    def predicted_kl_of(self, deltas: dict, shrink: float = 1.0) -> float:
        """κ = ½ Σ_ℓ (n/N) tr(Γ_ℓ δW_ℓ S_ℓ δW_ℓᵀ) of the step shrink · δθ, before calibration."""
        return 0.5 * float(sum(self.step_metric(n, self._snapshot[n], tuple(shrink * x for x in d))
                               for n, d in deltas.items()))

    @torch.no_grad()
    def _set_step(self, deltas: dict, shrink: float) -> None:
        """θ ← θ_before + shrink · δθ; shrink = 0 restores θ_before exactly (0 · inf is NaN)."""
        for name, layer in self.layers.items():
            for p, o, d in zip(self._params(layer), self._snapshot[name], deltas[name]):
                p.copy_(o if shrink == 0 else o + shrink * d)

    @torch.no_grad()
    def measured_kl(self) -> float:
        """Mean KL(p_before ‖ p_now) over the label tokens of the step's micro-batches (all ranks):
        one no-grad forward per micro-batch."""
        total = torch.zeros(2, dtype=torch.float64)
        for ids, labels, logits_before in self._micro:
            total[0] += float(C.kl_divergence(logits_before, self._label_logits(ids, labels)).sum())
            total[1] += int((labels != -100).sum())
        if self.all_reduce_sum is not None:              # DDP: the mean over every rank's tokens
            self.all_reduce_sum([total])
        kl = float(total[0] / total[1])
        return kl if math.isfinite(kl) else math.inf

    @torch.no_grad()
    def trust_region(self, t: int) -> None:
        """Scale the step δθ (AdamW's, and this step's reallocation) to a·δθ, a ∈ [0, 1], so that
        its measured KL is at most ρ (ours).

        The calibrated proxy proposes a (κ(a) ≈ a² κ(1) for small steps). Each proposal is
        checked by a measurement; the next one follows the same quadratic law from what was
        measured, a ← a·√(0.9 ρ / KL): down when the KL exceeds ρ, up (at most to 1) when it
        is below ρ/2. The largest a that passed is kept; a = 0 (no step) when none did within
        max_forwards checks, or when the step or its prediction is not finite.
        """
        deltas = {n: tuple(p - o for p, o in zip(self._params(m), self._snapshot[n]))
                  for n, m in self.layers.items()}
        rho, self.steps_seen = self.cfg.ctr_rho, self.steps_seen + 1
        finite = all(bool(torch.isfinite(d).all()) for ds in deltas.values() for d in ds)
        kappa = self.predicted_kl_of(deltas) if finite else math.inf
        calibrated = math.exp(self.log_ratio) * kappa
        shrink = 1.0 if calibrated <= rho else math.sqrt(0.9 * rho / calibrated)
        best, best_kl = 0.0, 0.0                             # a = 0 always passes: no change
        in_place = 1.0                                       # the parameters hold a = 1 now
        for _ in range(self.max_forwards if math.isfinite(kappa) else 0):
            self._set_step(deltas, shrink)
            in_place = shrink
            kl = self.measured_kl()
            self.forwards += 1
            predicted = self.predicted_kl_of(deltas, shrink)
            if math.isfinite(kl) and kl > 1e-7 and predicted > 0:   # calibrate on what is seen
                self.log_ratio += 0.3 * (math.log(kl / predicted) - self.log_ratio)
            if kl <= rho:
                best, best_kl = shrink, kl
                if shrink == 1.0 or kl >= 0.5 * rho:
                    break
            proposal = shrink * math.sqrt(0.9 * rho / kl) if 0 < kl < math.inf else shrink * 0.1
            proposal = 1.0 if kl == 0 else min(1.0, proposal)
            if proposal <= best or abs(proposal - shrink) < 1e-3 * shrink:
                break
            shrink = proposal
        if in_place != best:               # (a non-finite step is never checked: a = 0 here)
            self._set_step(deltas, best)
        self.steps_clipped += best < 1.0
        self._log = {"kappa": calibrated, "kl": best_kl, "shrink": best,
                     "kl_max": max(best_kl, self._log.get("kl_max", 0.0))}

    # --- the rank scheduler -------------------------------------------------------------------
    @torch.no_grad()
    def utility_scores(self) -> dict[str, torch.Tensor]:
        """Marginal utility u_i of every triplet (loss units per triplet, as the budget counts)."""
        out = {}
        for name, layer in self.layers.items():
            g = self.grad_lambda.get(name, torch.zeros_like(layer.lora_lambda))
            if self.cfg.ctr_metric == "hessian":
                H = self.hessian_diag[name][1]                     # curvature along λ_i, measured
            else:
                f = self.curvature[name]
                H = gauss_newton_curvature(f["S_r"], f["Gamma_r"], layer.scale)
            out[name] = marginal_utility(layer.lora_lambda.float(), g, H, layer.lora_mask.bool())
        return out

    def _select(self, scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
        active = {n: m.lora_mask.bool() for n, m in self.layers.items()}
        return select_with_hysteresis(scores, budget, active, self.cfg.ctr_hysteresis)

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        """The allocation first, then the trust region: the KL it bounds is that of everything the
        step changes, the triplets masked at this step included (their λ then reach 0 over the
        next steps, as fast as the radius allows)."""
        if self.cfg.ctr_trust_region and (self._snapshot is None or not self._micro):
            raise RuntimeError(
                "CTR-LoRA's trust region measures each step: call hooks.before_micro_batch(ids, "
                "labels, n_label_tokens) before every forward and hooks.before_optimizer_step("
                "optimizer, step) before optimizer.step() (the loop at the top of adapters.py)")
        t = self.t = step + 1
        if self.schedule is not None:
            self._allocate(t)
        else:
            for layer in self.layers.values():
                layer.apply_mask()
        if self.cfg.ctr_trust_region:
            self.trust_region(t)
        self._snapshot, self._micro = None, []
        return []

    def skip_step(self, step: int) -> list[nn.Parameter]:
        """Drop the step's statistics (collector sums), kept micro-batches and logits, and
        snapshot; the running averages and the EMA of ∂L/∂λ never saw it (they fold in
        before_optimizer_step). An allocation due now is deferred to the next good step (unlike
        AdaLoRA's, which happens now): masking moves the predictions, and only a good step has
        the trust region that bounds the move."""
        if self.collector is not None:
            self.collector.reset()
            self.collector.pause()
        self._snapshot, self._micro = None, []
        self.t = step + 1
        if self.schedule is not None and self.allocator.due(self.t):
            self.allocation_due = True
        return []

    def _allocate(self, t: int) -> None:
        self.budget = self.schedule(t)[0]
        force, self.allocation_due = self.allocation_due, False
        if self.allocator.step(t, self.utility_scores, force=force):
            ranks = {name: m.active_rank for name, m in self.layers.items()}
            self._unlogged_ranks = ranks
            print(f"ctr step {t}/{self.schedule.total_steps}: kept {sum(ranks.values())} of "
                  f"{self.schedule.initial} triplets (budget {self.budget}); "
                  f"{rank_summary(ranks)}", file=sys.stderr)

    def log_items(self) -> dict:
        # kl_max: the largest since the last log line (reset below)
        items = {**self._log, "rho": self.cfg.ctr_rho, "budget": self.budget,
                 "total_rank": sum(m.active_rank for m in self.layers.values()),
                 "clip_rate": self.steps_clipped / max(1, self.steps_seen),
                 "check_forwards": self.forwards}
        self.steps_clipped = self.steps_seen = self.forwards = 0
        self._log["kl_max"] = 0.0
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"curvature": self.curvature, "grad_lambda": self.grad_lambda,
                "hessian_diag": self.hessian_diag, "budget": self.budget,
                "log_ratio": self.log_ratio, "total_steps": self.cfg.total_steps,
                "allocation_due": self.allocation_due, "t": self.t}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        if self.schedule is not None:
            check_same_total_steps("CTR-LoRA's budget schedule", state, self.cfg)
        self.curvature = state.get("curvature", {})
        self.grad_lambda = state.get("grad_lambda", {})
        self.hessian_diag = state.get("hessian_diag", {})
        self.budget = state.get("budget", self.budget)
        self.log_ratio = state.get("log_ratio", 0.0)
        self.allocation_due = state.get("allocation_due", False)
        self.t = state.get("t", 0)               # (which steps collect: every --ctr-refresh)
        return []


def curvature_state_bytes(d_in: int, d_out: int, r: int, metric: str = "kfac-diag",
                          bytes_per: int = 4) -> int:
    """Bytes of CTR-LoRA's curvature state for one module, from shapes (memory.py)."""
    if metric == "hessian":
        n = d_out * r + r + r * d_in + r                   # diag H of (P, λ, Q), EMA ∂L/∂λ
    else:
        n = d_in + d_out + 2 * r * r + r + 1               # s, γ, S̃, Γ̃, EMA ∂L/∂λ, rows/labels
        if metric == "kfac-full":
            n += d_in * d_in + d_out * d_out               # S, Γ
    return n * bytes_per


# ===============================================================================================
# 6. CG-LoRA (Zheng & Proutière, arXiv 2603.29824). notes/cg_lora.md
#
#    Stated by the paper: prediction alignment (PEFT's predictions should match full
#    fine-tuning's); under a local NTK/K-FAC approximation the optimal low-rank update is a
#    Newton-like, curvature-whitened gradient; used as an initialization; "no shift" works best.
#    The formulas are this project's formulation (SPEC §6):
#
#    M = Γ^{-½} G S^{-½}                      the curvature-whitened gradient (G = ∂L/∂W)
#    ΔW* = −η Γ^{-½} [M]_r S^{-½}             = argmin_{rank ≤ r} ‖Γ^{½}(ΔW − ΔW_FT)S^{½}‖_F
#    B₀ = −√(η/c) Γ^{-½} U_r Σ_r^{½},  A₀ = √(η/c) Σ_r^{½} V_rᵀ S^{-½}   so c B₀ A₀ = ΔW*
#    η: measured KL(base ‖ init) = κ₀ (default, ours) or ½ η² Σ_ℓ ‖[M_ℓ]_r‖² = κ₀ (predicted)
#    then train as LoRA
# ===============================================================================================


class CGShiftLinear(LoRALinear):
    """CG-LoRA's "shift" variant without touching W0: the initial step is kept in buffers and
    subtracted,

        y = W0 x + c·B(A x) − c·B₀(A₀ x)      (= (W0 − c B₀A₀) x + c B A x, unchanged at init)

    so the base checkpoint stays the base, and the adapter exports to peft as an exact rank-2r
    LoRA: A' = [A; A₀], B' = [B, −B₀].
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)
        device = base.weight.device
        self.register_buffer("lora_A0", torch.zeros(r, self.in_features, device=device))
        self.register_buffer("lora_B0", torch.zeros(self.out_features, r, device=device))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        initial_step = F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return super().adapter_forward(x) - self.scale * initial_step

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (torch.cat([self.lora_A, self.lora_A0]),
                torch.cat([self.lora_B, -self.lora_B0], dim=1), self.scale)


def _feed_sketches(layers: dict, sketches: dict, batch: dict) -> list:
    """Forward hooks that feed each layer's sketch when its output gradient arrives (so activation
    checkpointing's recomputation, whose outputs get no gradient, is never counted). batch["rows"]
    are the rows of the factors (None = all) and batch["N"] the label tokens of the mean loss."""
    def make(name):
        def forward_hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x, rows, N = inputs[0].detach().flatten(0, -2), batch["rows"], batch["N"]

            def grad_hook(grad):                        # mean loss: per-token ĝ = N · ∂L/∂y
                sketches[name].update(x, grad.detach().flatten(0, -2), rows, n_loss_tokens=N)
            output.register_hook(grad_hook)
        return forward_hook
    return [layer.register_forward_hook(make(name)) for name, layer in layers.items()]


def cg_calibration_factors(model: nn.Module, layers: dict, batches, cfg: AdapterConfig, mode: str,
                           generator) -> tuple[dict, int]:
    """{name: (U, σ, V, S^{-½}, Γ^{-½})} of every adapted layer's whitened gradient, and the
    bytes of statistics held. One pass over the calibration batches.

    G = ∂L/∂W of the mean loss over all their label tokens: the true gradient, to which prompt
    positions contribute through attention. S and Γ (full or diagonal) over the label tokens, as
    K-FAC defines them, or over every position up to the last label (--cg-factor-tokens all).
    dense:  G from autograd, S and Γ from a KFACCollector; dense top-r SVD of M per layer.
    sketch: curvature.WhitenedGradientSketch per layer, O((d_in + d_out)·r) memory each.
    The adapters are still zero, so they are disabled during the pass: the same function,
    without their matmuls and saved tensors.
    """
    for name, layer in layers.items():
        if layer.merged or layer.lora_factors()[1].any():
            raise RuntimeError(f"CG-LoRA calibrates zero adapters, but {name} is merged or has "
                               f"B ≠ 0 (calibrate once, right after apply_method)")
    weights = [m.weight for m in layers.values()]
    if mode == "sketch" and hasattr(model, "model") and hasattr(model.model, "layers"):
        # the sketch needs only ∂L/∂y at the layer outputs: asking for the gradient of the first
        # norm weight makes backward reach every layer output without any weight gradient
        weights = [model.model.layers[0].input_layernorm.weight]
    stats = {"kfac-full": ["full"], "kfac-diag": ["diag"], "identity": []}[cfg.cg_curvature]
    collector = C.KFACCollector(layers, stats) if mode == "dense" and stats else None
    device = weights[0].device
    G, handles, batch = {}, [], {}
    if mode == "dense":
        G = {n: torch.zeros(m.out_features, m.in_features, device=device)
             for n, m in layers.items()}
    else:
        sketches = {n: C.WhitenedGradientSketch(m.in_features, m.out_features, cfg.r,
                                                cfg.cg_oversample, cfg.cg_curvature == "identity",
                                                generator, device) for n, m in layers.items()}
        handles = _feed_sketches(layers, sketches, batch)
    n_total, flags = 0, [w.requires_grad for w in weights]
    try:
        if collector is not None:
            collector.__enter__()
        for w in weights:
            w.requires_grad_(True)                               # so gradients reach the layers
        with adapters_disabled(layers):
            for inputs, labels in batches:
                mask = labels != -100
                N = int(mask.sum())
                factor_mask = (mask if cfg.cg_factor_tokens == "labels"
                               else C.positions_up_to_last_label(labels))
                if collector is not None:
                    collector.set_batch(factor_mask, reduction="mean", n_loss_tokens=N)
                rows = None if bool(factor_mask.all()) else factor_mask.flatten().nonzero()[:, 0]
                batch.update(rows=rows, N=N)
                logits = model.label_logits(inputs, mask).float()                # (N, vocab)
                grads = torch.autograd.grad(F.cross_entropy(logits, labels[mask]), weights)
                if mode == "dense":
                    for (n, _), g in zip(layers.items(), grads):
                        G[n].add_(g, alpha=N)                                     # Σ over tokens
                n_total += N
                del logits, grads
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        for h in handles:
            h.remove()
        if collector is not None:
            collector.__exit__(None, None, None)
    if mode != "dense":
        out = {name: sk.factors(cfg.cg_damping) for name, sk in sketches.items()}
        return out, sum(sk.bytes() for sk in sketches.values())
    factors = collector.factors() if collector is not None else {}
    out, extra = {}, 0
    for name in layers:
        Gn = G.pop(name).div_(n_total)                                           # ∂L/∂W
        S, Gamma, damping = None, None, 0.0
        if cfg.cg_curvature != "identity":
            f, damping = factors[name], cfg.cg_damping
            S, Gamma = (f.S, f.Gamma) if cfg.cg_curvature == "kfac-full" else (f.s, f.gamma)
        extra += 4 * (Gn.numel() + sum(t.numel() for t in (S, Gamma) if t is not None))
        w = C.whitened_svd_init(Gn, S, Gamma, cfg.r, kappa0=1.0, rel_damping=damping,
                                svd=cfg.cg_dense_svd, generator=generator)
        inverse_roots = [None if t is None else C.damped_inverse_sqrt(t, damping)
                         for t in (S, Gamma)]
        out[name] = (w.U, w.sigma, w.V, *inverse_roots)
    return out, extra


@torch.no_grad()
def cg_measured_step_size(model: nn.Module, batch, set_step: Callable[[float], None],
                          kappa0: float, eta0: float) -> tuple[float, list[tuple[float, float]]]:
    """η whose initial step has measured KL κ₀ (ours; SPEC §6's K-FAC prediction runs low):

        κ(η) = mean over the label tokens t of one calibration batch of KL(p_base,t ‖ p_η,t)

    p_base: the adapters at zero, p_η: with the step of size η (set_step(η) writes the factors).
    Only no-grad forwards: curvature.solve_step_size takes secant steps on log κ against log η
    from the predicted η0, at most 12 forwards and never beyond 10 η0 (a KL that saturates below
    κ₀ would otherwise inflate the factors without end). Returns (η, [(η_i, κ_i)]).
    """
    inputs, labels = batch
    mask = labels != -100
    was_training = model.training
    model.eval()
    try:
        set_step(0.0)
        base = F.log_softmax(model.label_logits(inputs, mask).float(), dim=-1)   # (N, vocab)
        p_base, evals = base.exp(), []

        def kl_of(eta: float) -> float:
            set_step(eta)
            logp = F.log_softmax(model.label_logits(inputs, mask).float(), dim=-1)
            kl = float((p_base * (base - logp)).sum(-1).mean())
            kl = kl if math.isfinite(kl) else 1e30
            evals.append((eta, kl))
            return kl

        eta, _, _ = C.solve_step_size(kl_of, kappa0, eta0, max_evals=12, max_factor=10.0)
    finally:
        model.train(was_training)
    return eta, evals


class CGLoRAHooks(MethodHooks):
    """CG-LoRA: LoRA whose (A, B) start as the curvature-whitened Newton-like step, then LoRA.

        calibrate(batches)   G, S, Γ over --cg-batches batches → top-r SVD of M per layer; one
                             global η (measured or predicted, see the section header); then
                             B₀, A₀ in every layer
                             no-shift: keep W₀ (the model starts one whitened step ahead)
                             shift:    W₀ − c B₀ A₀ as the base (CGShiftLinear)
    Everything after calibration is LoRA: the other hooks do nothing.
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.calibration_batches = cfg.cg_batches

    def calibrate(self, batches) -> dict:
        cfg = self.cfg
        layers = adapter_layers(self.model)
        dense_bytes = 4 * sum(m.in_features * m.out_features for m in layers.values())   # all G
        mode = cfg.cg_mode
        if mode == "auto":
            fits = dense_bytes <= cfg.cg_memory_cap_mb * 2 ** 20
            mode = "dense" if fits or cfg.cg_curvature == "kfac-full" else "sketch"
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        svds, extra = cg_calibration_factors(self.model, layers, batches, cfg, mode, generator)
        t_directions = time.perf_counter() - t0
        sigmas = torch.cat([sigma for (_, sigma, _, _, _) in svds.values()])
        eta_predicted = C.predicted_step_size(sigmas, cfg.cg_kappa0)

        @torch.no_grad()
        def set_step(eta: float) -> None:              # c·B A = −η Γ^{-½}[M]_r S^{-½} everywhere
            for name, layer in layers.items():
                B0, A0 = C.lora_factors_for_step(*svds[name], eta, layer.scale)
                layer.lora_A.copy_(A0)
                layer.lora_B.copy_(B0)

        eta, info = eta_predicted, {}
        if cfg.cg_kappa_source == "measured":
            eta, evals = cg_measured_step_size(self.model, batches[0], set_step, cfg.cg_kappa0,
                                               eta_predicted)
            info = {"cg_kl_measured": dict(evals)[eta], "cg_kl_at_predicted_eta": evals[0][1],
                    "cg_kl_forwards": len(evals), "cg_kl_evals": [[e, k] for e, k in evals]}
        set_step(eta)
        if cfg.cg_variant == "shift":                             # subtract the same step
            with torch.no_grad():
                for layer in layers.values():
                    layer.lora_A0.copy_(layer.lora_A)
                    layer.lora_B0.copy_(layer.lora_B)
        self.info = {"cg_mode": mode, "cg_eta": eta, "cg_eta_predicted": eta_predicted, **info,
                     "cg_init_s": time.perf_counter() - t0, "cg_directions_s": t_directions,
                     "cg_extra_mb": extra / 2 ** 20, "cg_dense_grad_mb": dense_bytes / 2 ** 20}
        self._report(eta, eta_predicted, info)
        return self.info

    def _report(self, eta: float, eta_predicted: float, info: dict) -> None:
        cfg, measured = self.cfg, ""
        if info:
            measured = (f"; measured KL {info['cg_kl_measured']:.3g} ({info['cg_kl_forwards']} "
                        f"forwards; {info['cg_kl_at_predicted_eta']:.3g} at the predicted η "
                        f"{eta_predicted:.3g})")
            if abs(math.log(max(info["cg_kl_measured"], 1e-30) / cfg.cg_kappa0)) > math.log(1.1):
                measured += (f" — WARNING: the measured KL did not reach --cg-kappa0 "
                             f"{cfg.cg_kappa0:g} (it may saturate below it on this model); "
                             f"consider a smaller --cg-kappa0")
        print(f"cg-lora init ({self.info['cg_mode']}, {cfg.cg_curvature}, {cfg.cg_variant}, "
              f"{cfg.cg_kappa_source}): η = {eta:.3g} for κ₀ = {cfg.cg_kappa0}{measured}, "
              f"{self.info['cg_init_s']:.1f}s, extra memory {self.info['cg_extra_mb']:.1f} MiB",
              file=sys.stderr)


# ===============================================================================================
# 7. Methods by name
# ===============================================================================================


def _build(method: str, base: nn.Linear, cfg: AdapterConfig, rank: int | None) -> AdaptedLinear:
    """One adapted layer for `method`; `rank`: a saved per-module shape rank (loading), or None."""
    if method == "lora" or (method == "cg" and cfg.cg_variant == "no-shift"):
        return LoRALinear(base, cfg.r if rank is None else rank, cfg.alpha, cfg.dropout)
    if method == "cg":                                        # CG-LoRA: LoRA with a special init
        return CGShiftLinear(base, cfg.r if rank is None else rank, cfg.alpha, cfg.dropout)
    if method in ("adalora", "ctr"):                          # CTR-LoRA uses AdaLoRA's SVD form
        r0 = svd_ranks(cfg)[0] if rank is None else rank
        return SVDLinear(base, r0, cfg.alpha, cfg.dropout)    # c = α / r₀
    if method == "triadapt":
        return TriAdaptLinear(base, r_ref=cfg.r, alpha=cfg.alpha, init_rank=triadapt_init_rank(cfg),
                              block=cfg.tri_block, dropout=cfg.dropout, init_std=cfg.tri_init_std,
                              rank=rank)
    raise ValueError(f"unknown adapter method {method!r}; known methods: {', '.join(METHODS)}")


METHODS = METHOD_NAMES
METHOD_HOOKS: dict[str, type[MethodHooks]] = {"lora": MethodHooks, "adalora": AdaLoRAHooks,
                                              "triadapt": TriAdaptHooks, "ctr": CTRLoRAHooks,
                                              "cg": CGLoRAHooks}


def apply_method(model: nn.Module, method: str, cfg: AdapterConfig | None = None,
                 ranks: dict[str, int] | None = None) -> dict[str, AdaptedLinear]:
    """The entry point: adapt `model` in place with `method` and return {name: layer}.

    Every nn.Linear named by cfg.targets is replaced by the method's layer (which keeps the same
    weight tensor); everything but the adapters is frozen. `ranks` optionally gives each module's
    saved shape rank (loading: LoRA's r, AdaLoRA's r₀, TriAdaptLoRA's grown rank).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; known methods: {', '.join(METHODS)}")
    cfg = cfg if cfg is not None else AdapterConfig(method=method)
    if cfg.method != method:
        raise ValueError(f"apply_method got method={method!r} but cfg.method={cfg.method!r}")
    if adapter_layers(model):
        raise ValueError("model already has adapters; apply adapters to a fresh base model")
    linears = targeted_linears(model, cfg.targets)
    if ranks is not None and set(ranks) != set(linears):
        missing, unexpected = sorted(set(linears) - set(ranks)), sorted(set(ranks) - set(linears))
        raise ValueError(f"the adapter's modules do not match this model's: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    layers = {}
    for name, linear in linears.items():
        rank = ranks.get(name) if ranks else None
        layers[name] = _build(method, linear, cfg, rank).train(linear.training)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layers[name])
    mark_only_adapters_trainable(model)
    return layers


def training_hooks(model: nn.Module, cfg: AdapterConfig) -> MethodHooks:
    """The hooks object of cfg.method for a model that already has its adapters."""
    return METHOD_HOOKS[cfg.method](model, cfg)
