"""
Adapters for Llama linears: LoRA, AdaLoRA, TriAdaptLoRA, CTR-LoRA, CG-LoRA.

Every adapted layer replaces one frozen `nn.Linear` (y = W0 x, W0: d_out x d_in) and adds a low-rank update ΔW:

        x ──────────────── W0 (frozen) ─────────────┐
        │                                           (+)──> y = W0 x + ΔW x
        └─ dropout ─> [adapter_forward: x -> ΔW x] ─┘      (ΔW never formed in the forward)

Notation follows SPEC.md §2. The layer *owns* the frozen base weight as `self.weight` (torchtune style), so a base
checkpoint key such as `model.layers.0.self_attn.q_proj.weight` loads unchanged into an adapted model, and the adapter
tensors sit beside it (`...q_proj.lora_A`, `...q_proj.lora_B`).

Contents, top to bottom:
  1. LowRankLinearFunction: y = W0 x + b + c B (A x) as one autograd node with its gradients written out (the hot
     path of every method); AdaptedLinear: the base class (frozen W0, dtype policy, explicit merge/unmerge)
  2. LoRALinear:     ΔW = (α/r) B A                                     (Hu et al. 2021, eq. 3)
     SVDLinear:      ΔW = (α/r₀) P diag(λ) Q, rank by a 0/1 mask       (AdaLoRA, Zhang et al. 2023; CTR-LoRA too)
     TriAdaptLinear: ΔW = (α/r_ref) B (L + U) A, grown block by block   (TriAdaptLoRA, SPEC §4: our formulation)
  3. AdapterConfig: the JSON-validated configuration (every method hyper-parameter is a field = a train.py flag)
  4. inject_adapters / apply_method: put adapters into a model by module name
  5. small free functions: trainable flags, adapter state dict, parameter counts, ranks, merge all, merged state dict;
     MethodHooks: what a method does around the optimizer step (nothing, for LoRA)
     shared rank machinery: orthogonality penalty, BudgetSchedule, keep_top_budget, MaskAllocator, SensitivityScores
     AdaLoRAHooks (sensitivity scores -> masks), TriAdaptHooks (normalized Frobenius norms -> growth),
     CTRLoRAHooks (K-FAC curvature -> marginal-utility masks, trust region on every step),
     CGLoRAHooks (calibration: curvature-whitened gradient SVD -> LoRA init; dense or one-pass sketch)
  6. save_adapter / load_adapter / load_adapter_weights (this project's format), export_peft (HF peft's format)

dtype policy: adapter tensors are fp32 even when W0 is bf16; the adapter path casts x to the adapter dtype and casts
its output back to the base output dtype. Merging is done in fp32 and checked for NaN/inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import typing
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fileio import atomic_write

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"  # this project's format
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # HF peft's format (with its own adapter_config.json)
FORMAT_VERSION = 1
LLAMA_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# -----------------------------------------------------------------------------
# 1. The base class of every adapted linear


class LowRankLinearFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + c · (x_a Aᵀ) Bᵀ as one autograd node, with the backward written out.

    This is the hot path of every adapted layer (ΔW = c B A; each method supplies its A, B via forward_factors).
    Writing the gradients by hand is shorter than it sounds and shows LoRA's gradients explicitly. N tokens:

        forward    h = x_a Aᵀ                          (N×r)
                   y = addmm(x W0ᵀ + b, h, Bᵀ, α=c)    (N×d_out; the adapter rides in the base GEMM's output,
                                                        no N×d_out temporaries for c·(…) or the sum)
        backward   g = ∂L/∂y                           (N×d_out)
                   (∂h)ᵀ = c · Bᵀ gᵀ                   (r×N)
                   ∂B    = c · gᵀ h  = c (hᵀ g)ᵀ       (d_out×r)
                   ∂A    = (∂h)ᵀ x_a                   (r×d_in)
                   ∂x    = g W0 + ∂h A                 (one addmm; if x_a is a dropout of x, ∂x_a = ∂h A separately
                                                        and dropout's own backward applies its mask)
                   ∂W0   = gᵀ x,  ∂b = Σ_tokens g     (only when asked: CG-LoRA's dense calibration)

    The r-sized products are computed in the layouts MKL runs fastest here ((∂h)ᵀ as Bᵀgᵀ, ∂B as (hᵀg)ᵀ — not g B and
    gᵀ h, which nn.Linear's backward uses): chosen by measurement, see notes/benchmarks.md. Same function and
    gradients as the unfused reference (`AdaptedLinear.reference_forward`) up to fp32 rounding; tests/test_adapters.py
    checks both, with dropout, bias, base-weight gradients and bf16 autocast.

    Inputs: x (..., d_in); x_a the adapter's input or None (= x, no dropout); weight, bias the frozen base; A (r, d_in),
    B (d_out, r); scale c; dtype the compute dtype (autocast's, or x's) — every operand is cast to it, so fp32
    adapters work with a bf16 base under autocast; autograd casts each gradient back to its parameter's dtype.
    """

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, A, B, scale, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)                                     # (N, d_in)
        xa2 = x2 if x_a is None else x_a.reshape(-1, shape[-1]).to(dtype)           # (N, d_in)
        W, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
        h = torch.mm(xa2, A.t())                                                    # (N, r)
        y = torch.mm(x2, W.t()) if bias is None else torch.addmm(bias.to(dtype), x2, W.t())
        y.addmm_(h, B.t(), alpha=scale)                                             # (N, d_out) += c h Bᵀ
        need_x, need_xa, need_w, _, need_A, need_B = ctx.needs_input_grad[:6]
        ctx.save_for_backward(x2 if need_w or (need_A and x_a is None) else None,   # only what backward needs
                              xa2 if need_A and x_a is not None else None,
                              W if need_x else None, A if need_x or need_xa else None, B,
                              h if need_B else None)
        ctx.scale, ctx.shape, ctx.has_bias, ctx.dropout = scale, shape, bias is not None, x_a is not None
        return y.view(*shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # backward(create_graph=True): these products are not differentiable again
            raise RuntimeError("a backward with create_graph=True (a Hessian-vector product?) reached a fused adapter "
                               "layer, which has no double backward: run it inside "
                               "curvature.twice_differentiable(model), or pass model=... to curvature.hvp/hutchinson_*")
        x2, xa2, W, A, B, h = ctx.saved_tensors
        need_x, need_xa, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(B.dtype)                         # (N, d_out)
        x_in = xa2 if ctx.dropout else x2
        grad_x = grad_xa = grad_w = grad_b = grad_A = grad_B = None
        grad_hT = torch.mm(B.t(), g.t()).mul_(ctx.scale)                             # (r, N) = c Bᵀ gᵀ
        if need_A:
            grad_A = torch.mm(grad_hT, x_in)                                         # (r, d_in)
        if need_B:
            grad_B = torch.mm(h.t(), g).mul_(ctx.scale).t().contiguous()             # (d_out, r)
        if need_x:
            grad_x = torch.mm(g, W)                                                  # (N, d_in) base path
            if not ctx.dropout:
                grad_x.addmm_(grad_hT.t(), A)                                        # + adapter path
            grad_x = grad_x.view(ctx.shape)
        if need_xa:
            grad_xa = torch.mm(grad_hT.t(), A).view(ctx.shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)                                             # (d_out, d_in)
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_xa, grad_w, grad_b, grad_A, grad_B, None, None


class AdaptedLinear(nn.Module):
    """A frozen linear `y = x W0ᵀ (+ b)` plus a trainable adapter `ΔW`, i.e. `y = x (W0 + ΔW)ᵀ (+ b)`.

    Owns the frozen base parameters as `weight` (d_out, d_in) and `bias` (d_out) or None, exactly like `nn.Linear`,
    so base checkpoints load with unchanged keys. A subclass (one per method) implements:

      adapter_forward(x)  x: (..., d_in) in the adapter dtype (dropout already applied) -> ΔW x: (..., d_out) —
                          the method's readable definition, in plain ops (reference_forward uses it)
      lora_factors()      (A (r, d_in), B (d_out, r), scale) with ΔW = scale · B A — used for export to peft
      forward_factors()   the same (A, B, scale) as the forward uses them; default lora_factors() (SVDLinear keeps
                          its masked triplets here, without a host sync). forward() feeds them to
                          LowRankLinearFunction, so each method's forward costs LoRA's plus parameter-sized work
      delta_weight()      ΔW (d_out, d_in) in fp32, only for merging; default: scale · B A from lora_factors

    Merging is explicit (`merge()` / `unmerge()`, never on `eval()`); while merged, forward is the base linear alone.
    Unmerge subtracts ΔW again, so with a bf16 base weight it restores W0 only up to bf16 rounding (no copy is kept).
    """

    fused = True  # False: forward = reference_forward, whose backward is differentiable (curvature.twice_differentiable)

    def __init__(self, base: nn.Linear, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"can only adapt nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (d_out, d_in), the same Parameter object: weight tying survives
        self.weight.requires_grad_(False)
        self.bias = base.bias  # (d_out,) or None; registered as None like nn.Linear(bias=False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # --- what a method implements ---------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement adapter_forward(x) -> ΔW x")

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement lora_factors() -> (A, B, scale)")

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B A in fp32, (d_out, d_in). Forms the full matrix: only for merging, never in forward."""
        A, B, scale = self.lora_factors()
        return scale * (B.float() @ A.float())

    @property
    def rank(self) -> int:
        """Rank r of the stored factors (the shape rank; a method with masks may use fewer directions)."""
        return self.lora_factors()[0].shape[0]

    @property
    def active_rank(self) -> int:
        """Number of directions in use now: the shape rank, fewer for a masked layer (AdaLoRA). For plots and logs."""
        return self.rank

    @property
    def adapter_dtype(self) -> torch.dtype:
        """dtype the adapter path computes in: that of the first adapter parameter (fp32 unless cast on purpose)."""
        for name, p in self._parameters.items():
            if name not in ("weight", "bias") and p is not None:
                return p.dtype
        return torch.float32

    def forward_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, c) with ΔW = c B A as the forward uses them (differentiable; default: lora_factors())."""
        return self.lora_factors()

    # --- shared machinery ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b + c B (A x): one fused node (LowRankLinearFunction) when the operands share a dtype or autocast
        is on — always, in this project's training runs; otherwise (or with fused = False) reference_forward."""
        if self.merged:
            return F.linear(x, self.weight, self.bias)  # ΔW already lives inside self.weight
        if not self.fused:
            return self.reference_forward(x)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if not autocast and not (x.dtype == self.weight.dtype == self.adapter_dtype):
            return self.reference_forward(x)  # e.g. a bf16 base with fp32 adapters and no autocast
        A, B, scale = self.forward_factors()
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        x_a = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        return LowRankLinearFunction.apply(x, x_a, self.weight, self.bias, A, B, scale, dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in plain ops, the adapter computed in the adapter dtype (the readable definition; also
        the path for mixed dtypes without autocast)."""
        y = F.linear(x, self.weight, self.bias)  # (..., d_out) in the base dtype
        if self.merged:
            return y
        x_adapter = self.dropout(x.to(self.adapter_dtype))  # (..., d_in), fp32
        return y + self.adapter_forward(x_adapter).to(y.dtype)  # (..., d_out)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + ΔW, computed in fp32 and checked for NaN/inf before anything is written."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        merged = self.weight.float() + self.delta_weight().to(self.weight.device)  # (d_out, d_in) fp32
        if not torch.isfinite(merged).all():
            raise ValueError("merged weight has NaN/inf: the adapter is broken (check the loss and learning rate)")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW in fp32: undoes merge up to fp32 rounding (up to bf16 rounding for a bf16 W0)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged; nothing to unmerge")
        base = self.weight.float() - self.delta_weight().to(self.weight.device)
        self.weight.copy_(base.to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base_dtype={self.weight.dtype}, merged={self.merged}")


# -----------------------------------------------------------------------------
# 2. LoRA


class LoRALinear(AdaptedLinear):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1, eq. 3):

        h = W0 x + ΔW x,   ΔW = c · B A,   c = α / r,   A ∈ R^{r×d_in},  B ∈ R^{d_out×r}

    A is Kaiming-uniform (as `nn.Linear` and peft do: bound 1/sqrt(d_in)), B = 0, so ΔW = 0 at initialization and
    the adapted model starts as the base model. The forward computes x → A x → B (A x) and never forms ΔW.

        x (.., d_in) ──A──> (.., r) ──B──> (.., d_out) ──× c──> ΔW x
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, dropout)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(d_in), 1/sqrt(d_in))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_A)  # (..., r)       = A x
        return self.scale * F.linear(h, self.lora_B)  # (..., d_out)   = c · B (A x)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    @property
    def rank(self) -> int:
        return self.r

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


# -----------------------------------------------------------------------------
# 2b. The SVD-form layer: AdaLoRA (and CTR-LoRA, which changes ranks the same way)

SVD_INIT_STD = 0.02  # P, Q ~ N(0, 0.02²): the official AdaLoRA code and peft


class SVDLinear(AdaptedLinear):
    """AdaLoRA's SVD-form update (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning", ICLR, §3.1 eq. 3 — stated by the paper; SPEC §3):

        ΔW = c · P diag(λ) Q,   c = α / r₀,   P ∈ R^{d_out×r₀},  λ ∈ R^{r₀},  Q ∈ R^{r₀×d_in}

    Triplet i is (P[:, i], λ_i, Q[i, :]). λ = 0 at init, so ΔW = 0 and the adapted model starts as the base model;
    P, Q ~ N(0, 0.02²). The rank changes by *masking*: the 0/1 buffer `lora_mask` (r₀,) records which triplets are
    kept, and the method's hooks call `apply_mask()` after every optimizer step, which sets masked λ_i to 0.
    The forward does not multiply by the mask, so ∂L/∂λ_i exists for masked triplets too (CTR-LoRA's utility of
    switching a triplet back on needs it); tensor shapes and optimizer state never change mid-run.

        x (.., d_in) ──Q──> (.., r₀) ──⊙λ──> (.., r₀) ──P──> (.., d_out) ──× c──> ΔW x
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init_std: float = SVD_INIT_STD):
        super().__init__(base, dropout)
        if r < 1:
            raise ValueError(f"SVD-form adapter rank must be >= 1, got r={r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        self.lora_P = nn.Parameter(torch.empty(self.out_features, r, device=device).normal_(0.0, init_std))
        self.lora_lambda = nn.Parameter(torch.zeros(r, device=device))
        self.lora_Q = nn.Parameter(torch.empty(r, self.in_features, device=device).normal_(0.0, init_std))
        self.register_buffer("lora_mask", torch.ones(r, device=device))  # 1 = triplet kept, 0 = masked

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_Q) * self.lora_lambda  # (..., r₀)    = diag(λ) Q x   (no mask here, see above)
        return self.scale * F.linear(h, self.lora_P)  # (..., d_out) = c · P diag(λ) Q x

    def forward_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A = diag(λ) Q (r₀×d_in), B = P: every triplet (masked ones have λ = 0), no host sync, differentiable."""
        return self.lora_lambda[:, None] * self.lora_Q, self.lora_P, self.scale

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ_i ← 0 for every masked triplet (called by the hooks after each optimizer step)."""
        self.lora_lambda.mul_(self.lora_mask)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The exact LoRA form of the kept triplets: A = diag(λ_kept) Q_kept (r×d_in), B = P_kept (d_out×r), scale c.

        Masked triplets have λ = 0 (apply_mask), so leaving them out changes nothing, and the exported rank is the
        allocated one. A module with no kept triplet exports one zero direction (peft's LoRA needs r ≥ 1).
        """
        keep = self.lora_mask.bool()
        if not keep.any():
            return (self.lora_Q.new_zeros(1, self.in_features), self.lora_P.new_zeros(self.out_features, 1),
                    self.scale)
        return self.lora_lambda[keep, None] * self.lora_Q[keep], self.lora_P[:, keep], self.scale

    @property
    def rank(self) -> int:
        return self.r  # the shape rank r₀: what save/load need to rebuild the tensors

    @property
    def active_rank(self) -> int:
        return int(self.lora_mask.sum().item())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r0={self.r}, active_rank={self.active_rank}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}")


# -----------------------------------------------------------------------------
# 2c. TriAdaptLoRA: a triangular core that grows block by block (SPEC §4 — this project's formulation)


class TriAdaptLinear(AdaptedLinear):
    """TriAdaptLoRA (Liang, Wang, Zeng 2025, arXiv 2501.08008). Stated by the paper: a triangular split of the
    transformation matrix into lower and upper triangular parts and rank *growth*. The paper's method section was
    not available: the parameterization, block layout and initialization below are this project's reconstruction
    (SPEC §4), built from the public peft-fork code with its bugs fixed.

        ΔW = c · B C A,   c = α / r_ref (fixed: does not shrink as r grows),   C = L + U ∈ R^{r×r}

    A (r×d_in) and B (d_out×r) are made of blocks; L is block lower triangular (diagonal blocks included) and U is
    strictly block upper triangular. Growth event n (block size k, rank r_{n-1} -> r_n = r_{n-1} + k) appends

        a_n (k×d_in) ~ N(0, σ²)         -> tri_A[n]     new rows of A
        b_n (d_out×k) = 0               -> tri_Bt[n]    new columns of B (the window holds b_nᵀ, k×d_out)
        R_n (k×r_n) = [0 | I_k]         -> tri_R[n]     new block-row of L, including the new diagonal block
        K_n (r_{n-1}×k) = 0             -> tri_K[n-1]   new block-column of U above the diagonal

    and old entries never move. With b_n = 0 and K_n = 0 the function is unchanged at growth, and every new tensor
    gets a gradient within two steps (b_n at once, K_n at once through the already trained B; a_n and R_n once
    b_n ≠ 0). The first block is A ~ N(0, σ²),
    C = R_0 = I, B = 0. (The public code starts B and C at zero, so nothing ever trains; it also rescales by 1/r,
    a jump at every growth.)

        x (.., d_in) ──A──> (.., r) ──C──> (.., r) ──B──> (.., d_out) ──× c──> ΔW x      (ΔW never formed)

        C = L + U after two growths:     ┌ r_0 ┬  k  ┬  k  ┐
                                     r_0 │ R_0 │     │     │     R_0: r_0×r_0, the first diagonal block
                                         ├─────┘ K_1 │ K_2 │     R_n: k×r_n, block-row n of L (diagonal included)
                                      k  │   R_1     │     │     K_n: r_{n-1}×k, block-column n of U
                                         ├───────────┘     │          (above the diagonal)
                                      k  │      R_2        │
                                         └─────────────────┘

    Storage (implementation only; the function and the training are the blocks' above). The forward wants A, B and
    C whole; SPEC §4 wants every growth event's tensors stepped with their own optimizer state and warm-up. So each
    factor is stored whole, as the parameter the forward reads (nothing is concatenated per step):

        tri_A_all   (r, d_in)    A
        tri_Bt_all  (r, d_out)   Bᵀ — transposed so that b_n, new *columns* of B, is a contiguous block of rows
        tri_C_all   (r²,)        the strips R_0, R_1, K_1, R_2, K_2, … flattened in the order growth made them;
                                 C is one gather from it (core())

    and the blocks are *windows*: parameters that share memory with a slice of those (tri_A, tri_Bt, tri_R, tri_K;
    not registered, so state_dict, DDP and parameters() see the whole tensors only). The optimizer steps the windows
    (optimizer_tensors(); each growth event's in a group of its own) and so updates the whole tensors in place.
    Backward fills the whole tensors' .grad; `hand_gradients_to_blocks()` (TriAdaptHooks.collect_gradients, before
    clipping) gives each window its slice of it. Growth allocates the whole tensors one block larger and re-points
    the old windows into them: the same Parameter objects, so their optimizer state stays. Each window is contiguous,
    as torch's fused AdamW requires. (Before 2026-11-24 each block was a parameter of its own and every forward
    concatenated them: ~19 tensors per module and their autograd nodes — notes/benchmarks.md.)
    """

    WHOLE = {"A": "tri_A_all", "Bt": "tri_Bt_all", "R": "tri_C_all", "K": "tri_C_all"}  # window kind -> storage

    def __init__(self, base: nn.Linear, r_ref: int, alpha: float, init_rank: int, block: int, dropout: float = 0.0,
                 init_std: float = SVD_INIT_STD, rank: int | None = None):
        super().__init__(base, dropout)
        if min(init_rank, block, r_ref) < 1:
            raise ValueError(f"TriAdaptLoRA needs init_rank, block and r_ref >= 1, got {init_rank}, {block}, {r_ref}")
        self.r_ref, self.alpha, self.scale = r_ref, alpha, alpha / r_ref
        self.init_rank, self.block, self.init_std = init_rank, block, init_std
        device = base.weight.device
        self.tri_A_all = nn.Parameter(torch.empty(init_rank, self.in_features, device=device).normal_(0.0, init_std))
        self.tri_Bt_all = nn.Parameter(torch.zeros(init_rank, self.out_features, device=device))
        self.tri_C_all = nn.Parameter(torch.eye(init_rank, device=device).flatten())  # R_0 = the first diagonal block
        self._windows: list[tuple[nn.Parameter, str, int]] = []  # (window, kind, offset in its whole tensor)
        self._add_windows([("A", (init_rank, self.in_features)), ("Bt", (init_rank, self.out_features)),
                           ("R", (init_rank, init_rank))])
        self._index: torch.Tensor | None = None  # cache of _core_index()
        if rank is not None:  # rebuild a grown structure (loading a saved adapter)
            self.grow_to(rank)

    # --- structure --------------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.tri_A_all.shape[0]

    @property
    def num_blocks(self) -> int:
        return 1 + (self.rank - self.init_rank) // self.block

    def _blocks(self, kind: str) -> list[nn.Parameter]:
        return [w for w, k, _ in self._windows if k == kind]

    tri_A = property(lambda self: self._blocks("A"), doc="[a_0, a_1, …]: windows into rows of A")
    tri_Bt = property(lambda self: self._blocks("Bt"), doc="[b_0ᵀ, b_1ᵀ, …]: windows into rows of Bᵀ")
    tri_R = property(lambda self: self._blocks("R"), doc="[R_0, R_1, …]: windows into the strips of C")
    tri_K = property(lambda self: self._blocks("K"), doc="[K_1, K_2, …]: windows into the strips of C")

    def _add_windows(self, specs: list[tuple[str, tuple[int, int]]]) -> list[nn.Parameter]:
        """New windows (kind, shape), each placed right after the windows already in its whole tensor — so the windows
        of a whole tensor tile it in creation order (hand_gradients_to_blocks splits by that order). Their values are
        whatever the whole tensors hold there."""
        new = []
        for kind, shape in specs:
            name = self.WHOLE[kind]
            offset = sum(w.numel() for w, k, _ in self._windows if self.WHOLE[k] == name)
            whole = getattr(self, name).detach().view(-1)
            w = nn.Parameter(whole[offset:offset + shape[0] * shape[1]].view(shape))  # requires_grad: whether it
            self._windows.append((w, kind, offset))  # trains is decided by the whole tensor (optimizer_tensors)
            new.append(w)
        return new

    def _point_windows(self) -> None:
        """Re-point every window into the current whole tensors (after growth, a device/dtype move, a copy)."""
        for w, kind, offset in self._windows:
            whole = getattr(self, self.WHOLE[kind]).detach().view(-1)
            w.data = whole[offset:offset + w.numel()].view(w.shape)

    def optimizer_tensors(self) -> list[nn.Parameter]:
        """What the optimizer steps: the windows, in creation order (a_0, b_0ᵀ, R_0, a_1, b_1ᵀ, R_1, K_1, …)."""
        return [w for w, _, _ in self._windows] if self.tri_A_all.requires_grad else []

    @torch.no_grad()
    def hand_gradients_to_blocks(self) -> None:
        """After a step's last backward: each window's .grad becomes its slice of its whole tensor's .grad (a view),
        and the whole tensors' .grad are cleared (the optimizer's zero_grad clears the windows'). A whole tensor
        without a gradient leaves its windows' alone, so a second call changes nothing."""
        A, Bt, C = self.tri_A_all, self.tri_Bt_all, self.tri_C_all
        rows = self._block_rows
        if A.grad is not None:  # a_n and b_nᵀ are blocks of rows: split the (r, d) gradients by rows
            for a, g in zip(self.tri_A, A.grad.split(rows)):
                a.grad = g
        if Bt.grad is not None:
            for b, g in zip(self.tri_Bt, Bt.grad.split(rows)):
                b.grad = g
        if C.grad is not None:  # R_0, R_1, K_1, R_2, K_2, … tile the strips in this order
            strips = [w for w, kind, _ in self._windows if kind in ("R", "K")]
            for w, g in zip(strips, C.grad.split([w.numel() for w in strips])):
                w.grad = g.view(w.shape)
        A.grad = Bt.grad = C.grad = None

    @property
    def _block_rows(self) -> list[int]:
        """Rows of A (and of Bᵀ, and of C) that each block holds: the first block's init_rank, then k per growth."""
        return [self.init_rank] + [self.block] * (self.num_blocks - 1)

    def grow(self) -> list[nn.Parameter]:
        """Growth event: append a_n, b_n, R_n, K_n (initialized so that ΔW is unchanged); returns their windows in
        that order."""
        k, r_prev, like = self.block, self.rank, self.tri_A_all
        with torch.no_grad():
            a = like.new_empty(k, self.in_features).normal_(0.0, self.init_std)  # (k, d_in)
            b_t = like.new_zeros(k, self.out_features)  # (k, d_out) = b_nᵀ
            R = torch.cat([like.new_zeros(k, r_prev), torch.eye(k, device=like.device, dtype=like.dtype)], dim=1)
            K = like.new_zeros(r_prev, k)  # (r_{n-1}, k)
            trainable = like.requires_grad
            self.tri_A_all = nn.Parameter(torch.cat([self.tri_A_all, a]), requires_grad=trainable)
            self.tri_Bt_all = nn.Parameter(torch.cat([self.tri_Bt_all, b_t]), requires_grad=trainable)
            self.tri_C_all = nn.Parameter(torch.cat([self.tri_C_all, R.flatten(), K.flatten()]),
                                          requires_grad=trainable)
        self._point_windows()
        self._index = None
        return self._add_windows([("A", tuple(a.shape)), ("Bt", tuple(b_t.shape)), ("R", tuple(R.shape)),
                                  ("K", tuple(K.shape))])

    def grow_to(self, rank: int) -> list[nn.Parameter]:
        """Grow until the rank is `rank` (= init_rank + n·block); returns the new windows."""
        if rank < self.rank or (rank - self.init_rank) % self.block:
            raise ValueError(f"TriAdaptLoRA rank {rank} is not reachable from rank {self.rank} in blocks of "
                             f"{self.block} (tri_init_rank {self.init_rank}, tri_block {self.block})")
        new = []
        while self.rank < rank:
            new += self.grow()
        return new

    # keep the windows pointing into the whole tensors whenever those are replaced
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._point_windows()
        for w, _, _ in self._windows:  # gradients handed over but not yet stepped move too (as Module._apply's do)
            if w.grad is not None:
                w.grad = fn(w.grad)
        return self

    def __setstate__(self, state):  # copy.deepcopy and pickle: the copied windows point into the copied tensors
        super().__setstate__(state)
        self._point_windows()

    def _load_from_state_dict(self, *args, **kwargs):  # (load_state_dict(..., assign=True) replaces the tensors)
        super()._load_from_state_dict(*args, **kwargs)
        self._point_windows()

    # --- the factors ------------------------------------------------------------------------------------------------
    def full_A(self) -> torch.Tensor:
        return self.tri_A_all  # (r, d_in)

    def full_B(self) -> torch.Tensor:
        return self.tri_Bt_all.t()  # (d_out, r), a view

    def lower(self) -> torch.Tensor:
        """L (r×r) from the R_n windows: block-row n is R_n, zeros right of its diagonal block. For inspection and
        tests (detached; the forward uses core())."""
        r = self.rank
        return torch.cat([F.pad(R.detach(), (0, r - R.shape[1])) for R in self.tri_R], dim=0)

    def upper(self) -> torch.Tensor:
        """U (r×r) from the K_n windows: block-column n ≥ 1 is K_n above the diagonal, zeros on and below it;
        block-column 0 is zero. For inspection and tests (detached)."""
        r = self.rank
        first = self.tri_C_all.new_zeros(r, self.init_rank)
        return torch.cat([first] + [F.pad(K.detach(), (0, 0, 0, r - K.shape[0])) for K in self.tri_K], dim=1)

    def core(self) -> torch.Tensor:
        """C = L + U (r×r). The strips tile C exactly once, so C is one gather from tri_C_all:
        C.flatten() = tri_C_all[index] (the same matrix as lower() + upper(); tests/test_triadapt.py checks it entry
        by entry). Before any growth the strips are R_0 = C itself, row-major: a view, no gather."""
        r = self.rank
        if self.num_blocks == 1:
            return self.tri_C_all.view(r, r)
        return self.tri_C_all[self._core_index()].view(r, r)

    def _core_index(self) -> torch.Tensor:
        """(r²,) position of each entry of C in tri_C_all; rebuilt after growth or a device move."""
        device = self.tri_C_all.device
        if self._index is None or self._index.device != device:
            rows = [0]
            for k in self._block_rows:
                rows.append(rows[-1] + k)  # block n covers rows/columns rows[n]:rows[n+1] of C
            index = torch.empty(self.rank, self.rank, dtype=torch.long)
            n_R = n_K = 0  # R_0, R_1, … and K_1, K_2, … in the order growth made them
            for w, kind, offset in self._windows:
                at = offset + torch.arange(w.numel()).view(w.shape)  # where its entries sit in tri_C_all
                if kind == "R":  # R_n: rows of block n, columns up to the end of block n
                    index[rows[n_R]:rows[n_R + 1], :rows[n_R + 1]] = at
                    n_R += 1
                elif kind == "K":  # K_n: rows above block n, columns of block n
                    n_K += 1
                    index[:rows[n_K], rows[n_K]:rows[n_K + 1]] = at
            self._index = index.flatten().to(device)
        return self._index

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.full_A())  # (..., r)     = A x
        z = F.linear(h, self.core())  # (..., r)     = C A x
        return self.scale * F.linear(z, self.full_B())  # (..., d_out) = c · B C A x

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Plain LoRA form for export: A' = A, B' = B C, scale c = α/r_ref (SPEC §4)."""
        return self.full_A(), self.full_B() @ self.core(), self.scale

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, blocks={self.num_blocks}, r_ref={self.r_ref}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}")


# -----------------------------------------------------------------------------
# 3. Configuration


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter's structure. Round-trips through JSON; validated on construction.

    method:  one of METHODS ("lora", "adalora", "triadapt", ...)
    r:       rank per module (LoRA's r; AdaLoRA's default target rank; TriAdaptLoRA's reference rank r_ref)
    alpha:   LoRA α; the update is scaled by c = α / r (AdaLoRA: α / r₀; TriAdaptLoRA: α / r_ref, fixed)
    dropout: dropout on the adapter input only (the base path never sees dropout)
    targets: leaf names of the linears to adapt, e.g. ["q_proj", "v_proj"] (a comma string is accepted here too)
    Later methods add their fields below this line; every field must have a default, a JSON-able type and a
    `help` (train.py turns each into a flag: `t_init` -> `--t-init`). A method ignores the fields of other methods,
    and the defaults leave LoRA unchanged. -1 / 0 defaults are derived from --steps / --rank as each help says.
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    # --- shared by the methods with a training schedule (AdaLoRA, TriAdaptLoRA, CTR-LoRA) ----------------------------
    total_steps: int = field(default=0, metadata={"help": "total optimizer steps T of the run, for the rank schedules "
                                                          "(train.py sets it from --steps; 0 = not known yet)"})
    orth_reg: float = field(default=0.1, metadata={"help": "AdaLoRA/TriAdaptLoRA: weight γ of the orthogonality "
                                                           "penalty on the adapter factors (0 = off)"})
    # --- AdaLoRA (SPEC §3) -------------------------------------------------------------------------------------------
    init_rank: int = field(default=0, metadata={"help": "AdaLoRA: initial rank r₀ of every module (0 = 1.5 × the "
                                                        "target rank, rounded up)"})
    target_rank: int = field(default=0, metadata={"help": "AdaLoRA: final average rank; the budget is target rank × "
                                                          "modules (0 = --rank)"})
    t_init: int = field(default=-1, metadata={"help": "AdaLoRA: warm-up steps before the first rank allocation "
                                                      "(-1 = 10%% of --steps)"})
    t_final: int = field(default=-1, metadata={"help": "AdaLoRA: final steps with the rank mask frozen "
                                                       "(-1 = 30%% of --steps)"})
    delta_t: int = field(default=10, metadata={"help": "AdaLoRA: steps between two rank allocations"})
    budget_schedule: str = field(default="cubic", metadata={"help": "AdaLoRA: how the budget falls from initial to "
                                                                    "target: cubic (the paper) or linear"})
    beta1: float = field(default=0.85, metadata={"help": "AdaLoRA: EMA factor β₁ of the smoothed sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "AdaLoRA: EMA factor β₂ of the uncertainty"})
    # --- TriAdaptLoRA (SPEC §4) --------------------------------------------------------------------------------------
    tri_init_rank: int = field(default=0, metadata={"help": "TriAdaptLoRA: rank of every module before growth "
                                                            "(0 = half of --rank, at least 1); --rank is the "
                                                            "reference rank r_ref, the budget is r_ref × modules"})
    tri_block: int = field(default=1, metadata={"help": "TriAdaptLoRA: ranks a module gains per growth (block k)"})
    tri_warmup: int = field(default=-1, metadata={"help": "TriAdaptLoRA: step of the first growth event T_w "
                                                          "(-1 = 10%% of --steps)"})
    tri_interval: int = field(default=-1, metadata={"help": "TriAdaptLoRA: steps between growth events "
                                                            "(-1 = 10%% of --steps, at least 1)"})
    tri_final: int = field(default=-1, metadata={"help": "TriAdaptLoRA: last step with a growth event T_final "
                                                         "(-1 = 70%% of --steps)"})
    tri_threshold: str = field(default="linear", metadata={"help": "TriAdaptLoRA: how many modules grow per event: "
                                                                   "linear, exponential or fixed (--tri-top-k)"})
    tri_top_k: int = field(default=1, metadata={"help": "TriAdaptLoRA: modules grown per event with "
                                                        "--tri-threshold fixed"})
    tri_init_std: float = field(default=SVD_INIT_STD, metadata={"help": "TriAdaptLoRA: std σ of new rows of A"})
    # --- CTR-LoRA (SPEC §5; its budget uses --init-rank, --target-rank, --t-init, --t-final, --delta-t,
    #     --budget-schedule and --orth-reg above) ----------------------------------------------------------------------
    ctr_metric: str = field(default="kfac-diag", metadata={"help": "CTR-LoRA: curvature proxy of the trust region "
                                                                   "and utilities: kfac-diag (scales to 13B), "
                                                                   "kfac-full (small models) or hessian (Hutchinson)"})
    ctr_schedule: bool = field(default=True, metadata={"help": "CTR-LoRA: marginal-utility rank scheduling (off: "
                                                               "every triplet stays active — an ablation)"})
    ctr_trust_region: bool = field(default=True, metadata={"help": "CTR-LoRA: scale steps whose predicted KL "
                                                                   "exceeds the radius (off: an ablation)"})
    ctr_rho: float = field(default=0.01, metadata={"help": "CTR-LoRA: trust radius ρ, the largest K-FAC-predicted "
                                                           "KL (nats per token) one step may cause (the prediction "
                                                           "runs low: notes/ctr_lora.md)"})
    ctr_rho_warmup: int = field(default=-1, metadata={"help": "CTR-LoRA: steps over which ρ grows from ρ/10 to ρ "
                                                              "(-1 = 10%% of --steps, 0 = none)"})
    ctr_beta: float = field(default=0.95, metadata={"help": "CTR-LoRA: EMA factor of the curvature statistics and "
                                                            "of ∂L/∂λ"})
    ctr_refresh: int = field(default=1, metadata={"help": "CTR-LoRA: fold new curvature statistics every N steps"})
    ctr_probes: int = field(default=1, metadata={"help": "CTR-LoRA: Hutchinson probes per refresh with "
                                                         "--ctr-metric hessian"})
    ctr_hysteresis: float = field(default=0.1, metadata={"help": "CTR-LoRA: a masked triplet replaces an active one "
                                                                 "only if its utility is higher by this factor + 1"})
    # --- CG-LoRA (SPEC §6) -------------------------------------------------------------------------------------------
    cg_variant: str = field(default="no-shift", metadata={"help": "CG-LoRA: no-shift (start one whitened step ahead; "
                                                                  "the paper's best) or shift (subtract the initial "
                                                                  "step: the function is unchanged at init)"})
    cg_curvature: str = field(default="kfac-diag", metadata={"help": "CG-LoRA: whitening: kfac-full (small models), "
                                                                     "kfac-diag, or identity (plain gradient SVD, the "
                                                                     "LoRA-GA/LoRA-One ablation)"})
    cg_kappa0: float = field(default=0.3, metadata={"help": "CG-LoRA: KL κ₀ (nats per label token) between the base "
                                                            "and the initialized model; sets the step size η (see "
                                                            "--cg-kappa-source; 0.3 was best of 0.003–1 on the demo "
                                                            "task: notes/cg_lora.md)"})
    cg_kappa_source: str = field(default="measured", metadata={"help": "CG-LoRA: measured (η such that the measured "
                                                                       "KL(base ‖ init) on one calibration batch is "
                                                                       "κ₀; a few no-grad forwards) or predicted "
                                                                       "(the K-FAC prediction ½η²Σ‖[M]_r‖² = κ₀, which "
                                                                       "runs low)"})
    cg_factor_tokens: str = field(default="labels", metadata={"help": "CG-LoRA: tokens of the curvature factors S, "
                                                                      "Γ: labels (K-FAC's label tokens, SPEC §2) or "
                                                                      "all (every position up to the last label of "
                                                                      "its sequence, the positions G sums over)"})
    cg_split: str = field(default="sqrt", metadata={"help": "CG-LoRA: how c·B₀A₀ is split between the factors: sqrt "
                                                            "(Σ^½ each side), balanced (equal column/row norms) or "
                                                            "lora (rows of A₀ with LoRA's init norm)"})
    cg_batches: int = field(default=8, metadata={"help": "CG-LoRA: calibration micro-batches for G, S, Γ"})
    cg_damping: float = field(default=1e-3, metadata={"help": "CG-LoRA: damping of S and Γ, relative to their mean "
                                                              "diagonal"})
    cg_mode: str = field(default="auto", metadata={"help": "CG-LoRA: dense (per-layer G, SVD), sketch (one-pass "
                                                           "randomized sketch, O((d_in + d_out)·r) memory per layer) "
                                                           "or auto (sketch when dense G exceeds --cg-memory-cap-mb)"})
    cg_memory_cap_mb: float = field(default=1024.0, metadata={"help": "CG-LoRA: memory for dense gradients before "
                                                                      "auto mode switches to sketches"})
    cg_dense_svd: str = field(default="exact", metadata={"help": "CG-LoRA dense mode: exact (full SVD of each "
                                                                 "whitened gradient) or randomized (top-r with 4r "
                                                                 "columns and 4 power iterations, as LoRA-GA's code)"})
    cg_oversample: int = field(default=10, metadata={"help": "CG-LoRA: extra sketch columns beyond the rank"})

    def __post_init__(self):
        if isinstance(self.targets, str):  # "q_proj,v_proj" from a command line (JSON must give a list)
            self.targets = parse_targets(self.targets)
        hints = typing.get_type_hints(type(self))
        _check_types({f.name: getattr(self, f.name) for f in fields(self)}, hints)
        for f in fields(self):
            if hints[f.name] is float:
                setattr(self, f.name, float(getattr(self, f.name)))  # JSON 16 -> 16.0
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; known methods: {', '.join(METHODS)}")
        if self.r < 1:
            raise ValueError(f"adapter config key 'r' must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"adapter config key 'alpha' must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter config key 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"adapter config key 'targets' is empty; give module names such as {LLAMA_LINEAR_NAMES}")
        if self.total_steps < 0:
            raise ValueError(f"--steps (total_steps) must be >= 0, got {self.total_steps}")
        if self.method == "adalora":
            _validate_adalora(self)
        if self.method == "triadapt":
            _validate_triadapt(self)
        if self.method == "ctr":
            _validate_ctr(self)
        if self.method == "cg":
            _validate_cg(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown adapter config key(s) {unknown}; known keys: {', '.join(known)}")
        _check_types(d, typing.get_type_hints(cls))  # before __post_init__'s conveniences (comma strings)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))


def _flag(name: str) -> str:
    """The train.py flag of a config field: t_init -> --t-init (error messages name what the user typed)."""
    return "--" + name.replace("_", "-")


def _steps_or_fraction(cfg: AdapterConfig, name: str, fraction: float, minimum: int = 0) -> int:
    """A step count from the config: the field's value if >= 0, else (-1) round(fraction · total_steps)."""
    value = getattr(cfg, name)
    if value >= 0:
        return value
    if value != -1:
        raise ValueError(f"{_flag(name)} must be >= 0 (or -1 for the default), got {value}")
    if cfg.total_steps < 1:
        raise ValueError(f"{_flag(name)} -1 means a fraction of --steps, but total_steps is not set; pass "
                         f"total_steps (train.py sets it from --steps) or give {_flag(name)}")
    return max(minimum, round(fraction * cfg.total_steps))


def adalora_ranks(cfg: AdapterConfig) -> tuple[int, int]:
    """(initial rank r₀, target rank) per module, defaults resolved: target = --rank, r₀ = ⌈1.5 · target⌉."""
    for name in ("init_rank", "target_rank"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0 (0 = default), got {getattr(cfg, name)}")
    target = cfg.target_rank or cfg.r
    initial = cfg.init_rank or math.ceil(1.5 * target)
    if initial < target:
        raise ValueError(f"--target-rank {target} is larger than --init-rank {initial}: AdaLoRA only removes ranks; "
                         f"lower --target-rank or raise --init-rank")
    return initial, target


def _validate_adalora(cfg: AdapterConfig) -> None:
    adalora_ranks(cfg)
    for name in ("beta1", "beta2"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ValueError(f"{_flag(name)} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.orth_reg < 0:
        raise ValueError(f"--orth-reg must be >= 0, got {cfg.orth_reg}")
    if cfg.total_steps > 0:
        adalora_schedule(cfg, n_modules=1)  # budgets scale with the module count: one module checks them all
    else:
        BudgetSchedule.check_options(cfg.delta_t, cfg.budget_schedule)


def triadapt_init_rank(cfg: AdapterConfig) -> int:
    """Rank of every TriAdaptLoRA module before growth: --tri-init-rank, default max(1, r_ref // 2)."""
    init = cfg.tri_init_rank or max(1, cfg.r // 2)
    if cfg.tri_init_rank < 0 or init > cfg.r:
        raise ValueError(f"--tri-init-rank {cfg.tri_init_rank} must be in [1, --rank {cfg.r}] (0 = half of --rank): "
                         f"--rank is the reference rank, the budget is --rank × modules")
    return init


def triadapt_events(cfg: AdapterConfig) -> tuple[int, int, int]:
    """(T_w, interval, T_final) of the growth events, defaults resolved (10%, 10%, 70% of --steps)."""
    warmup = _steps_or_fraction(cfg, "tri_warmup", 0.1)
    interval = _steps_or_fraction(cfg, "tri_interval", 0.1, minimum=1)
    final = _steps_or_fraction(cfg, "tri_final", 0.7)
    if interval < 1:
        raise ValueError(f"--tri-interval must be >= 1, got {interval}")
    if final <= warmup:
        raise ValueError(f"--tri-final {final} must come after --tri-warmup {warmup}: no step is left for growth")
    if cfg.total_steps and final > cfg.total_steps:
        raise ValueError(f"--tri-final {final} is after the last step (--steps {cfg.total_steps}); lower it")
    return warmup, interval, final


def _validate_triadapt(cfg: AdapterConfig) -> None:
    triadapt_init_rank(cfg)
    if cfg.tri_block < 1:
        raise ValueError(f"--tri-block must be >= 1, got {cfg.tri_block}")
    if cfg.tri_threshold not in THRESHOLD_MODES:
        raise ValueError(f"--tri-threshold must be one of {', '.join(THRESHOLD_MODES)}, got {cfg.tri_threshold!r}")
    if cfg.tri_top_k < 1:
        raise ValueError(f"--tri-top-k must be >= 1, got {cfg.tri_top_k}")
    if cfg.tri_init_std <= 0:
        raise ValueError(f"--tri-init-std must be > 0, got {cfg.tri_init_std}")
    if cfg.orth_reg < 0:
        raise ValueError(f"--orth-reg must be >= 0, got {cfg.orth_reg}")
    if cfg.total_steps > 0 or min(cfg.tri_warmup, cfg.tri_interval, cfg.tri_final) >= 0:
        triadapt_events(cfg)


def parse_targets(text: str) -> list[str]:
    """Split a comma list: "q_proj, v_proj" -> ["q_proj", "v_proj"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_types(values: dict, hints: dict) -> None:
    """Raise a one-line ValueError naming the first key whose value does not match its type hint."""
    for key, value in values.items():
        if not _has_type(value, hints[key]):
            raise ValueError(f"adapter config key {key!r} must be {_type_name(hints[key])}, "
                             f"got {type(value).__name__} {value!r}")


def _has_type(value, tp) -> bool:
    """Does a JSON-ish value match a type hint (int, float, str, bool, list[X], dict[str, X], X | None)?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
    if args:  # Union / Optional
        return any(_has_type(value, a) for a in args)
    raise TypeError(f"AdapterConfig field type {tp} is not supported by the JSON validator")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


# -----------------------------------------------------------------------------
# 4. Putting adapters into a model


def _build_lora(base: nn.Linear, cfg: AdapterConfig, r: int | None) -> LoRALinear:
    return LoRALinear(base, r=cfg.r if r is None else r, alpha=cfg.alpha, dropout=cfg.dropout)


def _build_adalora(base: nn.Linear, cfg: AdapterConfig, r: int | None) -> SVDLinear:
    r0 = adalora_ranks(cfg)[0] if r is None else r
    return SVDLinear(base, r=r0, alpha=cfg.alpha, dropout=cfg.dropout)  # c = α / r₀


def _build_triadapt(base: nn.Linear, cfg: AdapterConfig, r: int | None) -> TriAdaptLinear:
    return TriAdaptLinear(base, r_ref=cfg.r, alpha=cfg.alpha, init_rank=triadapt_init_rank(cfg), block=cfg.tri_block,
                          dropout=cfg.dropout, init_std=cfg.tri_init_std, rank=r)  # r: a saved (grown) rank


# method name -> builder(base linear, config, saved rank of this module or None for the method's default)
METHODS: dict[str, Callable[[nn.Linear, AdapterConfig, int | None], AdaptedLinear]] = {
    "lora": _build_lora,
    "adalora": _build_adalora,
    "triadapt": _build_triadapt,
    "ctr": _build_adalora,          # CTR-LoRA uses AdaLoRA's SVD-form layer (ranks change by masking)
    "cg": lambda base, cfg, r: (CGShiftLinear if cfg.cg_variant == "shift" else LoRALinear)(
        base, r=cfg.r if r is None else r, alpha=cfg.alpha, dropout=cfg.dropout),   # CG-LoRA: LoRA, special init
}


def _name_matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name equals the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def inject_adapters(model: nn.Module, targets: list[str],
                    make_layer: Callable[[str, nn.Linear], AdaptedLinear]) -> dict[str, AdaptedLinear]:
    """Replace every `nn.Linear` whose name ends in one of `targets` with `make_layer(name, linear)`.

    Returns {module name: new layer}. Each target must match at least one linear, else a ValueError names the
    linear names that do exist.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapters; load or apply adapters to a fresh base model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(_name_matches(name, target) for name in linears):
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target {target!r} matches no nn.Linear in the model; linear names are: "
                             f"{', '.join(leaf_names)}")
    chosen = [name for name in linears if any(_name_matches(name, t) for t in targets)]
    new_layers = {}
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new_layers[name] = make_layer(name, linears[name]).train(linears[name].training)  # keep train/eval mode
        setattr(parent, child_name, new_layers[name])
    return new_layers


def apply_method(model: nn.Module, method: str, cfg: AdapterConfig | None = None,
                 ranks: dict[str, int] | None = None) -> dict[str, AdaptedLinear]:
    """The entry point: adapt `model` in place with `method` (one of METHODS) and return {name: layer}.

    `ranks` optionally gives a per-module rank as saved by save_adapter (loading: LoRA's per-module r, AdaLoRA's
    r₀, TriAdaptLoRA's grown rank); otherwise every module gets the method's initial rank (`cfg.r` for LoRA).
    Also freezes everything except the adapter parameters.
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; known methods: {', '.join(METHODS)}")
    cfg = cfg if cfg is not None else AdapterConfig(method=method)
    if cfg.method != method:
        raise ValueError(f"apply_method got method={method!r} but cfg.method={cfg.method!r}; make them agree")
    build = METHODS[method]
    layers = inject_adapters(model, cfg.targets,
                             lambda name, base: build(base, cfg, ranks.get(name) if ranks else None))
    if ranks is not None and set(ranks) != set(layers):
        missing, unexpected = sorted(set(layers) - set(ranks)), sorted(set(ranks) - set(layers))
        remove_adapters(model)
        raise ValueError(f"per-module ranks do not match the targeted modules: missing {missing}, "
                         f"unexpected {unexpected}")
    mark_only_adapters_trainable(model)
    return layers


def remove_adapters(model: nn.Module) -> dict[str, nn.Linear]:
    """Undo inject_adapters: put plain nn.Linear layers back, sharing the (current) weight tensors.

    If a layer is merged its merged weight is kept (this is 'merge and unload'); unmerge first to get W0 back.
    """
    restored = {}
    for name, layer in adapter_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        if layer.bias is not None:
            linear.bias = layer.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
        restored[name] = linear
    return restored


# -----------------------------------------------------------------------------
# 5. Small free functions (loralib style)


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """{module name: adapted layer} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank in use now}: LoRA's r, AdaLoRA's kept triplets, TriAdaptLoRA's grown rank.
    For logs and the rank heatmap (eval.plot_rank_heatmap)."""
    return {name: layer.active_rank for name, layer in adapter_layers(model).items()}


def adapter_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{full parameter name: parameter} of adapter parameters only (not the frozen base weight/bias)."""
    out = {}
    for name, layer in adapter_layers(model).items():
        for pname, p in layer.named_parameters():
            if pname not in ("weight", "bias"):
                out[f"{name}.{pname}"] = p
    return out


def optimizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors an optimizer steps, in model order: every trainable parameter, except that a TriAdaptLoRA layer
    gives its growth blocks (windows into its whole factors, TriAdaptLinear.optimizer_tensors) instead of the whole
    factors — so that every block keeps optimizer state of its own. Shared (tied) parameters appear once."""
    out, seen = [], set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, TriAdaptLinear):
            own = [p for p in own if p is module.weight or p is module.bias] + module.optimizer_tensors()
        for p in own:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """requires_grad = True for adapter parameters, False for everything else (embeddings, norms, W0, lm_head)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_named_parameters(model).values():
        p.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (parameters and buffers such as masks), keyed by full name, detached."""
    out = {}
    for name, layer in adapter_layers(model).items():
        for key, t in layer.state_dict().items():
            if key not in ("weight", "bias"):
                out[f"{name}.{key}"] = t.detach()
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "adapter"} parameter counts (shared/tied tensors counted once)."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapter": sum(p.numel() for p in adapter_named_parameters(model).values()),
    }


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base weight (fp32, NaN-checked); raises naming the first broken module."""
    for name, layer in adapter_layers(model).items():
        try:
            layer.merge()
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain base state dict (original key names, base dtypes) with every adapter merged: W0 + ΔW in fp32.

    Does not modify the model. Raises ValueError naming the module if a merged weight has NaN/inf.
    """
    layers = adapter_layers(model)
    adapter_keys = set(adapter_state_dict(model))
    out = {k: v.detach() for k, v in model.state_dict().items() if k not in adapter_keys}
    for name, layer in layers.items():
        if layer.merged:
            continue  # self.weight already holds W0 + ΔW
        merged = layer.weight.float() + layer.delta_weight().to(layer.weight.device)  # (d_out, d_in) fp32
        if not torch.isfinite(merged).all():
            raise ValueError(f"{name}: merged weight has NaN/inf; the adapter is broken")
        out[f"{name}.weight"] = merged.to(layer.weight.dtype)
    return out


# -----------------------------------------------------------------------------
# 5b. Per-method training hooks, called visibly by train.py's loop


class MethodHooks:
    """What a method does around the optimizer step. This base class is plain LoRA: every hook does nothing.

    train.py calls, in this order, every step:
        per micro-batch: hooks.before_micro_batch(ids, labels, n_label); loss.backward()   (curvature statistics;
                         the last micro-batch's loss includes hooks.regularizer() if not None: orthogonality)
        hooks.collect_gradients()                                     (TriAdaptLoRA: gradients to the blocks)
        clip; hooks.before_optimizer_step(optimizer, step)            (CTR-LoRA: fold curvature, snapshot params)
        optimizer.step(); new = hooks.after_optimizer_step(step); optimizer.zero_grad()  (trust region, masking,
                                                                                        growth, allocation;
                                                                                        .grad is still readable)
    and hooks.log_items() when logging, hooks.close() at the end. state_dict() / restore_structure() carry method
    state (e.g. grown block counts) through checkpoints; state_dict() must hold only plain types and tensors (read
    with weights_only=True).
    """

    def __init__(self, model: nn.Module | None = None, cfg: AdapterConfig | None = None):
        self.model, self.cfg = model, cfg

    def before_micro_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, n_label_tokens: int) -> None:
        pass  # curvature collectors (CTR-LoRA) learn which tokens carry a loss; nothing for LoRA/AdaLoRA/TriAdaptLoRA

    def regularizer(self) -> torch.Tensor | None:
        return None  # LoRA has no penalty term

    def collect_gradients(self) -> None:
        pass  # after the step's last backward, before clipping: TriAdaptLoRA hands gradients to its block windows

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        return []  # parameters created this step (they join the optimizer as a new group)

    def log_items(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        """Rebuild structure saved by state_dict() (before weights and optimizer state load). Returns the parameter
        groups created mid-run, as (params, start_step) in the order they joined the optimizer."""
        return []

    def close(self) -> None:
        pass  # release what the method attached to the model (e.g. CTR-LoRA's statistics hooks)

    calibration_batches = 0  # > 0: train.py calls calibrate() with that many micro-batches before the first step

    # Several processes (train.py under torchrun): train.py sets all_reduce_sum to a function that sums a list of
    # tensors over the ranks in place, and world_size. Gradients arrive already all-reduced (DDP); a method whose
    # decisions use per-rank statistics (CTR-LoRA's K-FAC sums, its Hutchinson estimates) reduces them with it, so
    # that every rank decides identically. Calibration (CG-LoRA) runs on the same batches on every rank.
    all_reduce_sum: Callable[[list[torch.Tensor]], None] | None = None
    world_size = 1

    def calibrate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        return {}  # data-dependent initialization (CG-LoRA); returns figures to log


# -----------------------------------------------------------------------------
# 5c. Rank machinery shared by AdaLoRA and CTR-LoRA (the penalty is TriAdaptLoRA's too)


def orthogonality_penalty(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """AdaLoRA's orthogonality regularizer (Zhang et al. 2023, §3.1 eq. 4 — stated by the paper), with unsquared
    Frobenius norms averaged over every factor matrix, exactly as the official code and peft compute it:

        R = 1/(2K) Σ_k ( ‖P_kᵀ P_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F ),     factors = [(P_k (d_out×r_k), Q_k (r_k×d_in))]

    SPEC §3 writes mean_k(‖PᵀP − I‖ + ‖QQᵀ − I‖), which is 2R; we follow the official code so that γ (--orth-reg)
    means what peft's orth_reg_weight means (tests/test_adalora.py checks R against peft). TriAdaptLoRA applies the
    same penalty to its whole (B, A) (SPEC §4: this project's choice).

    Batched: factors of equal shapes (one group per linear type in a Llama: 7 groups instead of 210 modules) are
    stacked, and PᵀP − I, QQᵀ − I and their norms are one bmm / one batched norm per group.
    """
    groups: dict[tuple, list] = {}
    for P, Q in factors:
        groups.setdefault((tuple(P.shape), tuple(Q.shape)), []).append((P, Q))
    terms = []
    for pairs in groups.values():
        P = torch.stack([p for p, _ in pairs])  # (n, d_out, r)
        Q = torch.stack([q for _, q in pairs])  # (n, r, d_in)
        eye = torch.eye(P.shape[-1], device=P.device, dtype=P.dtype)  # (r, r)
        terms.append(torch.linalg.matrix_norm(P.transpose(1, 2) @ P - eye))  # (n,) ‖PᵀP − I‖_F
        terms.append(torch.linalg.matrix_norm(Q @ Q.transpose(1, 2) - eye))  # (n,) ‖QQᵀ − I‖_F
    return torch.cat(terms).mean()


class BudgetSchedule:
    """The global budget b(t) (number of kept components) and the steps that re-allocate it. AdaLoRA's schedule
    (Zhang et al. 2023, §3.3 eq. 12 — stated by the paper), written to equal peft's RankAllocator.budget_schedule
    step for step, including when it masks (tests/test_adalora.py compares them):

        t ≤ t_i            b(t) = b₀                                              no allocation (warm-up)
        t_i < t ≤ T − t_f  b(t) = ⌊b_T + (b₀ − b_T) (1 − (t − t_i)/(T − t_i − t_f))³⌋   allocate when t % ΔT == 0
        t > T − t_f        b(t) = b_T                                             mask frozen (peft re-applies it)

    t counts completed optimizer steps (1..T). shape="linear" uses the first power instead of the cube (this
    project's option, for ablations). Shared by AdaLoRA and CTR-LoRA (budgets in triplets or parameters).
    Validated on construction: one-line errors naming the flag.
    """

    SHAPES = ("cubic", "linear")

    def __init__(self, initial: int, target: int, total_steps: int, t_init: int, t_final: int, delta_t: int,
                 shape: str = "cubic"):
        self.check_options(delta_t, shape)
        if total_steps < 1:
            raise ValueError("the rank budget schedule needs the run's length: set total_steps (train.py sets it "
                             "from --steps)")
        if t_init < 0 or t_final < 0:
            raise ValueError(f"--t-init and --t-final must be >= 0, got {t_init} and {t_final}")
        if t_init + t_final >= total_steps:
            raise ValueError(f"--t-init {t_init} + --t-final {t_final} must be less than --steps {total_steps}: no "
                             f"step is left to allocate ranks; lower --t-init/--t-final or raise --steps")
        if target < 1:
            raise ValueError(f"the final rank budget must be > 0, got {target}; raise --target-rank")
        if target > initial:
            raise ValueError(f"the final rank budget {target} exceeds the initial budget {initial}: ranks are only "
                             f"removed; lower --target-rank or raise --init-rank")
        self.initial, self.target, self.total_steps = initial, target, total_steps
        self.t_init, self.t_final, self.delta_t, self.shape = t_init, t_final, delta_t, shape

    @classmethod
    def check_options(cls, delta_t: int, shape: str) -> None:
        if delta_t < 1:
            raise ValueError(f"--delta-t must be >= 1, got {delta_t}")
        if shape not in cls.SHAPES:
            raise ValueError(f"--budget-schedule must be one of {', '.join(cls.SHAPES)}, got {shape!r}")

    @property
    def freeze_step(self) -> int:
        """T − t_f: the last allocation (at b_T); the mask is frozen after it."""
        return self.total_steps - self.t_final

    def __call__(self, t: int) -> tuple[int, bool]:
        """(b(t), whether step t allocates) — peft's (budget, mask_ind) for shape="cubic"."""
        if t <= self.t_init:
            return self.initial, False
        if t > self.freeze_step:
            return self.target, True
        progress = 1 - (t - self.t_init) / (self.total_steps - self.t_final - self.t_init)
        power = 3 if self.shape == "cubic" else 1
        return int((self.initial - self.target) * progress ** power + self.target), t % self.delta_t == 0


def keep_top_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """Global top-b: 0/1 masks (shaped like the scores) keeping the `budget` highest scores over all modules.

    Exactly `budget` entries are kept; ties go to the earlier module / index. (peft masks `score ≤ k-th smallest`,
    which drops every tie and can keep fewer than b(t); with distinct scores the two agree.)
    """
    flat = torch.cat([s.flatten() for s in scores.values()])  # (Σ r_ℓ,)
    keep = torch.zeros_like(flat)
    keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = 1.0
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


class MaskAllocator:
    """Keeps the SVD-form layers at the scheduled budget (SPEC §3, §5): at an allocation step of the schedule, and
    once more at t = T − t_f with b_T, masks ← select(scores(), b(t)); after T − t_f the masks are frozen. After
    every optimizer step the masked λ are set to 0. The score is plugged in: AdaLoRA's sensitivity × uncertainty,
    or CTR-LoRA's marginal utility (with a hysteresis `select`).
    """

    def __init__(self, layers: dict[str, SVDLinear], schedule: BudgetSchedule,
                 select: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] = keep_top_budget):
        self.layers, self.schedule, self.select = layers, schedule, select

    @torch.no_grad()
    def step(self, t: int, scores: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Allocate if step t is an allocation step (returns True then); always zero the masked λ."""
        budget, allocate_now = self.schedule(t)
        freeze = self.schedule.freeze_step
        allocate = (allocate_now and t < freeze) or t == freeze
        if allocate:
            masks = self.select(scores(), budget)
            for name, layer in self.layers.items():
                layer.lora_mask.copy_(masks[name])
        for layer in self.layers.values():
            layer.apply_mask()
        return allocate


class SensitivityScores:
    """AdaLoRA's importance of every adapter entry (Zhang et al. 2023, §3.2 eqs. 8–11 — stated by the paper),
    computed as peft computes it, one Ī and one Ū per parameter entry:

        I = |θ ⊙ ∂L/∂θ|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s = Ī ⊙ Ū

    and the triplet score (eq. 7):  S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
    update() runs after optimizer.step and before zero_grad (as peft's update_and_allocate): θ is the updated value
    and ∂L/∂θ the (clipped) gradient of the step just taken. Under DDP gradients are already all-reduced, so every
    rank computes the same scores and makes the same decisions.
    """

    def __init__(self, layers: dict[str, SVDLinear], beta1: float, beta2: float):
        self.layers, self.beta1, self.beta2 = layers, beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}  # "<module>.lora_P" -> Ī, same shape as the parameter
        self.unc: dict[str, torch.Tensor] = {}  # "<module>.lora_P" -> Ū

    def _named_params(self):
        for name, layer in self.layers.items():
            for pname in ("lora_P", "lora_lambda", "lora_Q"):
                yield f"{name}.{pname}", getattr(layer, pname)

    @torch.no_grad()
    def update(self) -> None:
        """The three lines above for every P, λ, Q at once: torch._foreach_* ops over the list of tensors (one
        kernel launch per op instead of one per tensor — 630 tensors for SmolLM2's 210 modules). lerp(a, b, w) =
        a + w (b − a) = (1 − w) a + w b, so Ī ← lerp(Ī, I, 1 − β₁) is eq. 9 (equal up to fp32 rounding)."""
        keys, params = [], []
        for key, p in self._named_params():
            if p.grad is None:
                continue
            if key not in self.avg:
                self.avg[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            keys.append(key)
            params.append(p)
        if not params:
            return
        avg, unc = [self.avg[k] for k in keys], [self.unc[k] for k in keys]
        sensitivity = torch._foreach_mul(params, [p.grad for p in params])
        torch._foreach_abs_(sensitivity)  # I = |θ ⊙ ∇θ|
        torch._foreach_lerp_(avg, sensitivity, 1 - self.beta1)  # Ī ← β₁ Ī + (1 − β₁) I
        deviation = torch._foreach_sub(sensitivity, avg)
        torch._foreach_abs_(deviation)  # |I − Ī|
        torch._foreach_lerp_(unc, deviation, 1 - self.beta2)  # Ū ← β₂ Ū + (1 − β₂) |I − Ī|

    def _score(self, key: str, p: torch.Tensor) -> torch.Tensor:
        return self.avg[key] * self.unc[key] if key in self.avg else torch.zeros_like(p)  # s = Ī ⊙ Ū

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: S (r₀,)} with S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)."""
        out = {}
        for name, layer in self.layers.items():
            s_P = self._score(f"{name}.lora_P", layer.lora_P)  # (d_out, r₀)
            s_lambda = self._score(f"{name}.lora_lambda", layer.lora_lambda)  # (r₀,)
            s_Q = self._score(f"{name}.lora_Q", layer.lora_Q)  # (r₀, d_in)
            out[name] = s_lambda + s_P.mean(dim=0) + s_Q.mean(dim=1)
        return out

    def reset(self) -> None:
        self.avg, self.unc = {}, {}

    def state_dict(self) -> dict:
        return {"avg": dict(self.avg), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        self.avg, self.unc = dict(state.get("avg", {})), dict(state.get("unc", {}))


def adalora_schedule(cfg: AdapterConfig, n_modules: int) -> BudgetSchedule:
    """AdaLoRA's budget schedule for a model with `n_modules` adapted linears (budgets in triplets)."""
    initial_rank, target_rank = adalora_ranks(cfg)
    if cfg.total_steps < 1:
        raise ValueError("AdaLoRA needs the run's total optimizer steps for its budget schedule: set total_steps "
                         "(train.py sets it from --steps)")
    return BudgetSchedule(initial_rank * n_modules, target_rank * n_modules, cfg.total_steps,
                          _steps_or_fraction(cfg, "t_init", 0.1), _steps_or_fraction(cfg, "t_final", 0.3),
                          cfg.delta_t, cfg.budget_schedule)


def _check_same_total_steps(what: str, state: dict, cfg: AdapterConfig) -> None:
    """A schedule derived from T must not change under a resumed run (train.py lets --steps change on resume)."""
    saved = state.get("total_steps", cfg.total_steps)
    if saved != cfg.total_steps:
        raise ValueError(f"{what} was planned for --steps {saved}, not {cfg.total_steps}: resume with --steps {saved} "
                         f"(the ranks already allocated depend on it)")


def _rank_summary(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    return f"rank per module min {min(values)}, mean {sum(values) / len(values):.1f}, max {max(values)}"


# -----------------------------------------------------------------------------
# 5d. AdaLoRA hooks


class AdaLoRAHooks(MethodHooks):
    """AdaLoRA around the optimizer step (Zhang et al. 2023; SPEC §3 — every piece stated by the paper):

        regularizer()            γ · R(P, Q)                                   (orthogonality_penalty)
        after_optimizer_step(t)  t < T − t_f: update s = Ī·Ū from |θ·∇θ|       (SensitivityScores)
                                 allocation steps: keep the global top-b(t) triplets by S_i, mask the rest
                                 every step: masked λ ← 0                      (MaskAllocator, BudgetSchedule)

    t = step + 1 counts completed optimizer steps, so the t_f frozen steps are the last t_f steps of the run.
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, SVDLinear)}
        if not self.layers:
            raise ValueError("AdaLoRA hooks need SVD-form adapters: call apply_method(model, 'adalora', cfg) first")
        self.schedule = adalora_schedule(cfg, len(self.layers))
        self.scores = SensitivityScores(self.layers, cfg.beta1, cfg.beta2)
        self.allocator = MaskAllocator(self.layers, self.schedule)
        self.budget = self.schedule.initial
        self._unlogged_ranks: dict[str, int] | None = None  # per-module ranks of the last allocation, for log_items

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        return self.cfg.orth_reg * orthogonality_penalty([(m.lora_P, m.lora_Q) for m in self.layers.values()])

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = step + 1
        if t < self.schedule.freeze_step:
            self.scores.update()
        self.budget = self.schedule(t)[0]
        if self.allocator.step(t, self.scores.triplet_scores):
            ranks = {name: m.active_rank for name, m in self.layers.items()}
            self._unlogged_ranks = ranks
            frozen = t == self.schedule.freeze_step
            print(f"adalora step {t}/{self.schedule.total_steps}: kept {sum(ranks.values())} of "
                  f"{self.schedule.initial} triplets (budget {self.budget}); {_rank_summary(ranks)}"
                  f"{'; mask frozen from here on' if frozen else ''}", file=sys.stderr)
            if frozen:
                self.scores.reset()  # no longer needed (peft frees them too)
        return []

    def log_items(self) -> dict:
        items = {"total_rank": sum(m.active_rank for m in self.layers.values()), "budget": self.budget}
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"scores": self.scores.state_dict(), "budget": self.budget, "total_steps": self.cfg.total_steps}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        _check_same_total_steps("AdaLoRA's budget schedule", state, self.cfg)
        self.scores.load_state_dict(state.get("scores", {}))
        self.budget = state.get("budget", self.budget)
        return []  # masks are buffers in the adapter weights; shapes never change


# -----------------------------------------------------------------------------
# 5e. TriAdaptLoRA: importance, dynamic threshold, growth (SPEC §4 — this project's formulation)

THRESHOLD_MODES = ("linear", "exponential", "fixed")


@torch.no_grad()
def normalized_frobenius_norm(layer: TriAdaptLinear) -> float:
    """ν_ℓ = ‖C_ℓ‖_F / N_ℓ, N_ℓ = number of blocks. The paper states importance from *normalized Frobenius norms*;
    normalizing by the block count is SPEC §4's reconstruction. No gradients and no per-entry buffers: cheap."""
    return (torch.linalg.matrix_norm(layer.core()) / layer.num_blocks).item()


def growth_count(mode: str, remaining: int, progress: float, n_modules: int, block: int, top_k: int = 1) -> int:
    """How many modules grow at an event. The paper states dynamic thresholds, linear growth working best; the rules
    are SPEC §4's reconstruction. R = remaining budget in ranks, p = progress in [0, 1]:

        linear: n = ⌊R·p⌋      exponential: n = ⌊R^p⌋      fixed: n = top_k (IncreLoRA-style)
        n = clamp(n, 1, min(#modules, ⌊R/k⌋)),  and 0 when R < k: the budget b_T is never overshot.
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
        raise ValueError(f"--tri-threshold must be one of {', '.join(THRESHOLD_MODES)}, got {mode!r}")
    return max(1, min(n, n_modules, remaining // block))


def highest(scores: list[float], n: int) -> list[int]:
    """Indices of the n highest scores, best first; ties go to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


class TriAdaptHooks(MethodHooks):
    """TriAdaptLoRA around the optimizer step (SPEC §4; the paper states growth under dynamic thresholds driven by
    normalized Frobenius norms, with warm-up, interval and reference rank — the rules are our reconstruction):

        regularizer()            γ · R(B, A) on each module's B and A                 (orthogonality_penalty)
        collect_gradients()      the whole factors' gradients -> the block windows    (hand_gradients_to_blocks)
        after_optimizer_step(t)  at t = T_w, T_w + interval, ... ≤ T_final:
                                   s_ℓ = ν_ℓ − ν_ℓ^prev                      (normalized_frobenius_norm)
                                   n = growth_count(...), the n highest s_ℓ grow by k (TriAdaptLinear.grow)
                                   ν^prev ← ν (after growth); the new tensors are returned -> a new optimizer group

    Budget b_T = r_ref × #modules. t = step + 1 counts completed steps; a group born at step s starts at s + 1.
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, TriAdaptLinear)}
        if not self.layers:
            raise ValueError("TriAdaptLoRA hooks need TriAdaptLoRA adapters: call apply_method(model, 'triadapt', "
                             "cfg) first")
        self.warmup, self.interval, self.final = triadapt_events(cfg)
        self.budget = cfg.r * len(self.layers)  # b_T = r_ref × #modules
        self.nu_prev = {name: normalized_frobenius_norm(m) for name, m in self.layers.items()}
        self.events: list[dict] = []  # [{"step": step, "modules": [names grown, in order]}] — the grown structure
        self._unlogged_ranks: dict[str, int] | None = None

    def total_rank(self) -> int:
        return sum(m.rank for m in self.layers.values())

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        return self.cfg.orth_reg * orthogonality_penalty([(m.full_B(), m.full_A()) for m in self.layers.values()])

    def collect_gradients(self) -> None:
        for m in self.layers.values():
            m.hand_gradients_to_blocks()

    def is_event(self, t: int) -> bool:
        return self.warmup <= t <= self.final and (t - self.warmup) % self.interval == 0

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = step + 1
        if not self.is_event(t):
            return []
        remaining = self.budget - self.total_rank()  # R, in ranks
        progress = min(1.0, max(0.0, (t - self.warmup) / (self.final - self.warmup)))  # p
        n = growth_count(self.cfg.tri_threshold, remaining, progress, len(self.layers), self.cfg.tri_block,
                         self.cfg.tri_top_k)
        if n == 0:
            return []
        names = list(self.layers)
        scores = [normalized_frobenius_norm(self.layers[name]) - self.nu_prev[name] for name in names]  # s_ℓ
        chosen = [names[i] for i in highest(scores, n)]
        new_params = [p for name in chosen for p in self.layers[name].grow()]
        self.nu_prev = {name: normalized_frobenius_norm(m) for name, m in self.layers.items()}
        self.events.append({"step": step, "modules": chosen})
        self._unlogged_ranks = {name: m.rank for name, m in self.layers.items()}
        print(f"triadapt step {t}/{self.cfg.total_steps or '?'}: {n} module(s) grew by {self.cfg.tri_block} "
              f"({self.cfg.tri_threshold} threshold, progress {progress:.2f}); total rank {self.total_rank()} of "
              f"budget {self.budget}; {_rank_summary(self._unlogged_ranks)}", file=sys.stderr)
        return new_params

    def log_items(self) -> dict:
        items = {"total_rank": self.total_rank(), "budget": self.budget}
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"events": [dict(e) for e in self.events], "nu_prev": dict(self.nu_prev),
                "total_steps": self.cfg.total_steps, "storage": "whole factors"}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        """Replay the saved growth events on the freshly built adapters (new tensors get placeholder values; the
        checkpoint's weights and optimizer state load into them next). Returns [(params, start_step)] in order."""
        _check_same_total_steps("TriAdaptLoRA's growth schedule", state, self.cfg)
        if state and state.get("storage") != "whole factors":  # b_n's optimizer state was d_out×k, now k×d_out
            raise ValueError("this TriAdaptLoRA checkpoint predates the whole-factor storage (2026-11-24) and its "
                             "optimizer state does not fit: finish it with an older checkout (739fa16) or start "
                             "again with --overwrite")
        groups = []
        for event in state.get("events", []):
            unknown = [name for name in event["modules"] if name not in self.layers]
            if unknown:
                raise ValueError(f"checkpoint grows module(s) {unknown[:3]} that this model does not adapt")
            groups.append(([p for name in event["modules"] for p in self.layers[name].grow()], event["step"] + 1))
        self.events = [dict(e) for e in state.get("events", [])]
        self.nu_prev = dict(state.get("nu_prev", self.nu_prev))
        return groups


# -----------------------------------------------------------------------------
# 5f. CTR-LoRA: curvature proxies, marginal-utility rank scheduling, metric trust region
#     (arXiv 2510.15962; SPEC §5 — the paper's method section was not available: the equations below are this
#     project's formulation, built to satisfy the paper's stated ideas; notes/ctr_lora.md says which is which)

CTR_METRICS = ("kfac-diag", "kfac-full", "hessian")


def gauss_newton_curvature(S_r: torch.Tensor, Gamma_r: torch.Tensor, scale: float) -> torch.Tensor:
    """H_i = c² · Γ̃_ii · S̃_ii (r₀,): the K-FAC Gauss-Newton curvature of the loss along λ_i (ours, SPEC §5).

    One unit of λ_i moves ΔW by c·p_i q_iᵀ, whose metric norm is c²·(p_iᵀ Γ p_i)(q_iᵀ S q_i); with the projected
    factors Γ̃ = Pᵀ Γ P and S̃ = Q S Qᵀ (r₀×r₀, from the adapter's own intermediates) those are their diagonals.
    """
    return scale ** 2 * torch.diagonal(Gamma_r) * torch.diagonal(S_r)


def marginal_utility(lam: torch.Tensor, g: torch.Tensor, H: torch.Tensor, active: torch.Tensor,
                     eps: float = 1e-12) -> torch.Tensor:
    """Second-order marginal utility of each triplet (SPEC §5 — ours; the paper states "marginal utility from
    lightweight second-order proxies"). From L(λ_i + δ) ≈ L + g_i δ + ½ H_i δ²  (exact for a quadratic loss):

        active i:  u_i = | ½ H_i λ_i² − g_i λ_i |     loss increase if the triplet is removed (δ = −λ_i; OBD)
        masked i:  u_i = g_i² / (2 H_i + ε)           loss decrease of a Newton step δ = −g_i / H_i switching it on
    """
    remove = (0.5 * H * lam ** 2 - g * lam).abs()
    add = g ** 2 / (2 * H + eps)
    return torch.where(active, remove, add)


def select_with_hysteresis(scores: dict[str, torch.Tensor], budget: int, active: dict[str, torch.Tensor],
                           eta: float) -> dict[str, torch.Tensor]:
    """Global top-b(t) where a masked component displaces an active one only if its score is higher by a factor
    1 + η (ours): active scores are multiplied by 1 + η before the top-b selection. Keeps exactly `budget`."""
    boosted = {n: s * torch.where(active[n], 1.0 + eta, 1.0) for n, s in scores.items()}
    return keep_top_budget(boosted, budget)


def ctr_schedule(cfg: AdapterConfig, n_modules: int) -> BudgetSchedule:
    """CTR-LoRA's budget: AdaLoRA's schedule machinery, in triplets (init rank → target rank per module)."""
    initial_rank, target_rank = adalora_ranks(cfg)
    return BudgetSchedule(initial_rank * n_modules, target_rank * n_modules, cfg.total_steps,
                          _steps_or_fraction(cfg, "t_init", 0.1), _steps_or_fraction(cfg, "t_final", 0.3),
                          cfg.delta_t, cfg.budget_schedule)


def _validate_ctr(cfg: AdapterConfig) -> None:
    if cfg.ctr_metric not in CTR_METRICS:
        raise ValueError(f"--ctr-metric must be one of {', '.join(CTR_METRICS)}, got {cfg.ctr_metric!r}")
    if cfg.ctr_rho <= 0:
        raise ValueError(f"--ctr-rho must be > 0 (a predicted KL per step), got {cfg.ctr_rho}")
    if not 0.0 <= cfg.ctr_beta < 1.0:
        raise ValueError(f"--ctr-beta must be in [0, 1), got {cfg.ctr_beta}")
    if cfg.ctr_refresh < 1 or cfg.ctr_probes < 1:
        raise ValueError("--ctr-refresh and --ctr-probes must be >= 1")
    if cfg.ctr_hysteresis < 0:
        raise ValueError(f"--ctr-hysteresis must be >= 0, got {cfg.ctr_hysteresis}")
    adalora_ranks(cfg)
    if cfg.ctr_schedule and cfg.total_steps > 0:
        ctr_schedule(cfg, n_modules=1)


class CTRLoRAHooks(MethodHooks):
    """CTR-LoRA around the optimizer step (SPEC §5; each part switchable for ablations):

        before_micro_batch      tell the K-FAC collector which tokens carry a loss and the step's token count
        regularizer()           γ · R(P, Q)                                        (as AdaLoRA)
        before_optimizer_step   fold this step's statistics into the EMA curvature (β), keep the EMA of ∂L/∂λ,
                                snapshot (P, λ, Q)                                   [curvature proxy]
        after_optimizer_step    δθ = AdamW's proposed step; κ = ½ Σ_ℓ tr(Γ_ℓ δW_ℓ S_ℓ δW_ℓᵀ); if κ > ρ(t) scale
                                the whole step by a ≈ √(ρ/κ), refined until κ(a) ≤ ρ  [trust region]
                                at allocation steps keep the global top-b(t) triplets by marginal utility per
                                parameter, with hysteresis; masked λ ← 0            [rank scheduler, --ctr-schedule]

    Curvature state per module in the default (kfac-diag) mode: s (d_in), γ (d_out), S̃ and Γ̃ (r₀×r₀), EMA of
    ∂L/∂λ (r₀): O(r₀² + d_in + d_out) — no d×d matrix at any scale. kfac-full adds S (d_in²) and Γ (d_out²) (small
    models only); hessian replaces the metric by a Hutchinson estimate of the Hessian diagonal of (P, λ, Q).
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        import curvature as C   # the second-order toolbox (curvature.py)
        self.C = C
        self.layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, SVDLinear)}
        if not self.layers:
            raise ValueError("CTR-LoRA hooks need SVD-form adapters: call apply_method(model, 'ctr', cfg) first")
        self.schedule = ctr_schedule(cfg, len(self.layers)) if cfg.ctr_schedule else None
        if self.schedule is not None:
            self.allocator = MaskAllocator(self.layers, self.schedule, select=self._select)
        self.budget = sum(m.active_rank for m in self.layers.values())
        self.collector = None                        # the hessian metric needs no K-FAC statistics
        if cfg.ctr_metric != "hessian":
            stats = ["diag", "projected"] + (["full"] if cfg.ctr_metric == "kfac-full" else [])
            # u = Pᵀ ĝ and h = Q x: the projection of the SVD form without diag(λ) (so H_i exists when λ_i = 0)
            self.collector = C.KFACCollector(self.layers, stats, projection=lambda m: (m.lora_Q, m.lora_P))
            self.collector.__enter__()               # hooks stay for the run; close() removes them
        self.curvature: dict[str, dict[str, torch.Tensor]] = {}   # EMA statistics per module
        self.grad_lambda: dict[str, torch.Tensor] = {}            # EMA of ∂L/∂λ per module
        self.hessian_diag: dict[str, list[torch.Tensor]] = {}     # --ctr-metric hessian: diag H of (P, λ, Q)
        self._batch = None                                        # last micro-batch (Hutchinson needs a loss)
        self._snapshot: dict[str, tuple[torch.Tensor, ...]] | None = None
        self.kappa = 0.0                          # predicted KL of the last proposed step (before scaling)
        self.steps_seen = self.steps_clipped = 0  # since the last log line
        self._unlogged_ranks: dict[str, int] | None = None
        self.t = 0                                # completed optimizer steps

    # --- the radius: a linear warm-up from ρ/10 to ρ over --ctr-rho-warmup steps (ours) -------------------------
    def rho(self, t: int) -> float:
        warm = _steps_or_fraction(self.cfg, "ctr_rho_warmup", 0.1)
        return self.cfg.ctr_rho * (1.0 if warm == 0 else min(1.0, 0.1 + 0.9 * t / warm))

    def close(self):
        if self.collector is not None:
            self.collector.__exit__(None, None, None)

    # --- hooks called by train.py ---------------------------------------------------------------------------------
    def before_micro_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, n_label_tokens: int) -> None:
        # the loop's loss is Σ CE / n_label_tokens of the whole step: per-token ĝ = n_label_tokens · ∂L/∂y
        if self.collector is not None:
            self.collector.set_batch(labels != -100, reduction="mean", n_loss_tokens=n_label_tokens)
        self._batch = (input_ids, labels)

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        return self.cfg.orth_reg * orthogonality_penalty([(m.lora_P, m.lora_Q) for m in self.layers.values()])

    def _params(self, layer: SVDLinear) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return layer.lora_P, layer.lora_lambda, layer.lora_Q

    @torch.no_grad()
    def _fold_statistics(self) -> None:
        """EMA(β) of this step's K-FAC statistics (the first ones are taken as they are)."""
        beta = self.cfg.ctr_beta
        if self.all_reduce_sum is not None:                  # DDP: the statistics of the global batch
            self.collector.all_reduce(self.all_reduce_sum)
        for name, f in self.collector.factors().items():
            new = {k: v for k, v in f.tensors().items()}
            old = self.curvature.get(name)
            self.curvature[name] = new if old is None else {k: beta * old[k] + (1 - beta) * v for k, v in new.items()}
        self.collector.reset()

    def _refresh_hessian(self) -> None:
        """Hutchinson estimate of diag H for every (P, λ, Q) on the last micro-batch (double backward, math path)."""
        ids, labels = self._batch
        params = [p for layer in self.layers.values() for p in self._params(layer)]
        with torch.enable_grad():
            diag = self.C.hutchinson_diagonal(lambda: self.model(ids, labels=labels), params,
                                              n_samples=self.cfg.ctr_probes, model=self.model)
        if self.all_reduce_sum is not None:                  # DDP: the mean of every rank's estimate
            self.all_reduce_sum(diag)
            diag = [d / self.world_size for d in diag]
        beta = self.cfg.ctr_beta
        for i, name in enumerate(self.layers):
            new = [d.clamp(min=0) for d in diag[3 * i:3 * i + 3]]     # a metric must be PSD: negative parts dropped
            old = self.hessian_diag.get(name)
            self.hessian_diag[name] = new if old is None else [beta * o + (1 - beta) * n for o, n in zip(old, new)]

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        refresh = step % self.cfg.ctr_refresh == 0 or not (self.curvature or self.hessian_diag)
        if self.collector is not None:
            self._fold_statistics() if refresh else self.collector.reset()
        elif refresh and self._batch is not None:
            self._refresh_hessian()
        with torch.no_grad():
            beta = self.cfg.ctr_beta
            for name, layer in self.layers.items():
                g = layer.lora_lambda.grad
                if g is None:
                    continue
                old = self.grad_lambda.get(name)
                self.grad_lambda[name] = g.detach().float().clone() if old is None else beta * old + (1 - beta) * g
            self._snapshot = {n: tuple(p.detach().clone() for p in self._params(l)) for n, l in self.layers.items()}

    @torch.no_grad()
    def step_metric(self, name: str, old: tuple, delta: tuple) -> torch.Tensor:
        """tr(Γ δW S δWᵀ) of one module's step (or Σ_p h_p δp² with the Hessian metric), without forming δW.

        δW is the *exact* change c (B′A′ − BA) of the SVD form, written as c (δB·A′ + B·δA) with B = P diag(λ),
        B′ = P′ diag(λ′), δB = B′ − B, A′ = Q′, δA = Q′ − Q: the same three r×r trace terms as the first-order form
        of SPEC §5 (curvature.low_rank_metric_norm_sq), with A′ in place of A. Ours, deliberately not first order:
        at init λ = 0, so to first order only P diag(δλ) Q moves, while AdamW moves every entry of P and Q by ~lr —
        the terms δP diag(δλ) Q, ... that first order drops are then the whole step (tests/test_ctr.py's stability
        test fails with the first-order κ).
        """
        layer = self.layers[name]
        if self.cfg.ctr_metric == "hessian":
            return sum((h * d.float() ** 2).sum() for h, d in zip(self.hessian_diag[name], delta))
        P, lam, Q = old
        dP, dlam, dQ = delta
        B = P * lam                                                  # (d_out, r₀)   P diag(λ)
        dB = (P + dP) * (lam + dlam) - B                            # (d_out, r₀)   B′ − B
        f = self.curvature[name]
        S, Gamma = (f["S"], f["Gamma"]) if self.cfg.ctr_metric == "kfac-full" else (f["s"], f["gamma"])
        return self.C.low_rank_metric_norm_sq(B, Q + dQ, dB, dQ, S, Gamma, layer.scale)

    def predicted_kl_of(self, deltas: dict, shrink: float = 1.0) -> float:
        """κ = ½ Σ_ℓ tr(Γ_ℓ δW_ℓ S_ℓ δW_ℓᵀ) of the step shrink · δθ."""
        return 0.5 * float(sum(self.step_metric(n, self._snapshot[n], tuple(shrink * x for x in d))
                               for n, d in deltas.items()))

    @torch.no_grad()
    def trust_region(self, t: int) -> None:
        """Shrink AdamW's proposed step δθ to a·δθ, a ∈ (0, 1], so that its predicted KL κ(a) ≤ ρ(t) (SPEC §5 — ours).

        κ(a) is quadratic in a to leading order, so a = √(ρ/κ) is the first guess; the exact δW has higher-order
        terms, so the guess is refined (a ← a·√(ρ/κ(a))) until κ(a) ≤ ρ — a few r×r evaluations per module.
        """
        for layer in self.layers.values():
            layer.apply_mask()                                       # masked λ are reset anyway: not part of δ
        deltas = {n: tuple(p - o for p, o in zip(self._params(l), self._snapshot[n])) for n, l in self.layers.items()}
        self.kappa = self.predicted_kl_of(deltas)
        rho = self.rho(t)
        self.steps_seen += 1
        if self.kappa <= rho:
            return
        self.steps_clipped += 1
        shrink, kappa = 1.0, self.kappa
        for _ in range(30):
            shrink *= math.sqrt(rho / kappa) * (1 - 1e-6)
            kappa = self.predicted_kl_of(deltas, shrink)
            if kappa <= rho:
                break
        for name, layer in self.layers.items():
            for p, o, d in zip(self._params(layer), self._snapshot[name], deltas[name]):
                p.copy_(o + shrink * d)

    @torch.no_grad()
    def utility_scores(self) -> dict[str, torch.Tensor]:
        """Marginal utility per parameter of every triplet: u_i / (d_in + d_out + 1)."""
        out = {}
        for name, layer in self.layers.items():
            g = self.grad_lambda.get(name, torch.zeros_like(layer.lora_lambda))
            if self.cfg.ctr_metric == "hessian":
                H = self.hessian_diag[name][1]                         # curvature along λ_i, measured
            else:
                f = self.curvature[name]
                H = gauss_newton_curvature(f["S_r"], f["Gamma_r"], layer.scale)
            u = marginal_utility(layer.lora_lambda.float(), g, H, layer.lora_mask.bool())
            out[name] = u / (layer.in_features + layer.out_features + 1)
        return out

    def _select(self, scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
        active = {n: m.lora_mask.bool() for n, m in self.layers.items()}
        return select_with_hysteresis(scores, budget, active, self.cfg.ctr_hysteresis)

    def after_optimizer_step(self, step: int) -> list[nn.Parameter]:
        t = self.t = step + 1
        if self.cfg.ctr_trust_region and self._snapshot is not None:
            self.trust_region(t)
        if self.schedule is not None:
            self.budget = self.schedule(t)[0]
            if self.allocator.step(t, self.utility_scores):
                ranks = {name: m.active_rank for name, m in self.layers.items()}
                self._unlogged_ranks = ranks
                print(f"ctr step {t}/{self.schedule.total_steps}: kept {sum(ranks.values())} of "
                      f"{self.schedule.initial} triplets (budget {self.budget}); {_rank_summary(ranks)}",
                      file=sys.stderr)
        else:
            for layer in self.layers.values():
                layer.apply_mask()
        self._snapshot = None
        return []

    def log_items(self) -> dict:
        items = {"kappa": self.kappa, "rho": self.rho(self.t), "budget": self.budget,
                 "total_rank": sum(m.active_rank for m in self.layers.values()),
                 "clip_rate": self.steps_clipped / max(1, self.steps_seen)}
        self.steps_clipped = self.steps_seen = 0
        if self._unlogged_ranks is not None:
            items["ranks"], self._unlogged_ranks = self._unlogged_ranks, None
        return items

    def state_dict(self) -> dict:
        return {"curvature": self.curvature, "grad_lambda": self.grad_lambda, "hessian_diag": self.hessian_diag,
                "budget": self.budget, "total_steps": self.cfg.total_steps}

    def restore_structure(self, state: dict) -> list[tuple[list[nn.Parameter], int]]:
        if self.schedule is not None:
            _check_same_total_steps("CTR-LoRA's budget schedule", state, self.cfg)
        self.curvature = state.get("curvature", {})
        self.grad_lambda = state.get("grad_lambda", {})
        self.hessian_diag = state.get("hessian_diag", {})
        self.budget = state.get("budget", self.budget)
        return []


def curvature_state_bytes(d_in: int, d_out: int, r: int, metric: str = "kfac-diag", bytes_per: int = 4) -> int:
    """Bytes of CTR-LoRA's curvature state for one module (EMA statistics + EMA of ∂L/∂λ), from shapes."""
    if metric == "hessian":
        n = d_out * r + r + r * d_in + r                   # diag H of (P, λ, Q), EMA ∂L/∂λ
    else:
        n = d_in + d_out + 2 * r * r + r                   # s, γ, S̃, Γ̃, EMA ∂L/∂λ
        if metric == "kfac-full":
            n += d_in * d_in + d_out * d_out               # S, Γ
    return n * bytes_per


# -----------------------------------------------------------------------------
# 5g. CG-LoRA: curvature-whitened gradient initialization for prediction alignment
#     (Zheng & Proutière, arXiv 2603.29824; SPEC §6 — stated: prediction alignment, Newton-like curvature-whitened
#     gradient, used as an initialization, "no shift" variant best; the formulas are this project's formulation)

CG_VARIANTS = ("no-shift", "shift")
CG_CURVATURES = ("kfac-full", "kfac-diag", "identity")
CG_MODES = ("auto", "dense", "sketch")
CG_KAPPA_SOURCES = ("measured", "predicted")
CG_FACTOR_TOKENS = ("labels", "all")


def _validate_cg(cfg: AdapterConfig) -> None:
    if cfg.cg_variant not in CG_VARIANTS:
        raise ValueError(f"--cg-variant must be one of {', '.join(CG_VARIANTS)}, got {cfg.cg_variant!r}")
    if cfg.cg_curvature not in CG_CURVATURES:
        raise ValueError(f"--cg-curvature must be one of {', '.join(CG_CURVATURES)}, got {cfg.cg_curvature!r}")
    if cfg.cg_mode not in CG_MODES:
        raise ValueError(f"--cg-mode must be one of {', '.join(CG_MODES)}, got {cfg.cg_mode!r}")
    if cfg.cg_mode == "sketch" and cfg.cg_curvature == "kfac-full":
        raise ValueError("--cg-mode sketch keeps O((d_in + d_out)·r) memory per layer, which full factors exceed: "
                         "use --cg-curvature kfac-diag or identity with it")
    if cfg.cg_kappa_source not in CG_KAPPA_SOURCES:
        raise ValueError(f"--cg-kappa-source must be one of {', '.join(CG_KAPPA_SOURCES)}, got {cfg.cg_kappa_source!r}")
    if cfg.cg_factor_tokens not in CG_FACTOR_TOKENS:
        raise ValueError(f"--cg-factor-tokens must be one of {', '.join(CG_FACTOR_TOKENS)}, "
                         f"got {cfg.cg_factor_tokens!r}")
    if cfg.cg_dense_svd not in ("exact", "randomized"):
        raise ValueError(f"--cg-dense-svd must be exact or randomized, got {cfg.cg_dense_svd!r}")
    import curvature as C                         # (the split's home: curvature.lora_factors_for_step)
    if cfg.cg_split not in C.CG_SPLITS:
        raise ValueError(f"--cg-split must be one of {', '.join(C.CG_SPLITS)}, got {cfg.cg_split!r}")
    if cfg.cg_kappa0 <= 0 or cfg.cg_batches < 1 or cfg.cg_oversample < 0:
        raise ValueError("--cg-kappa0 must be > 0, --cg-batches >= 1 and --cg-oversample >= 0")


class DiagWhitenedSketch:
    """One-pass, memory-bounded sketch of M = D_γ^{-½} G D_s^{-½} for one layer (ours; SPEC §6 memory-bounded mode).

    The whitening needs s = diag S and γ = diag Γ, which are only known after the calibration pass. But with
    diagonal factors the whitening commutes with the sketch: sketch G itself, Y = G Ω (d_out, k) and W = Ψ G
    (l, d_in), accumulating s and γ in the same pass; afterwards

        M (D_s^{½} Ω) = D_γ^{-½} Y        and        (Ψ D_γ^{½}) M = W D_s^{-½},

    i.e. exact single-pass sketches of M with the test matrices Ω' = D_s^{½}Ω and Ψ' = Ψ D_γ^{½}, and
    curvature.sketch_svd recovers M's top-r SVD from them (Tropp et al. 2017). Extra memory: Y, W, s, γ, Ω, Ψ —
    O((d_in + d_out)·k), no d_out×d_in matrix. With identity curvature s = γ = 1 and this is a plain gradient sketch.
    G gets every position (it is ∂L/∂W); s and γ the label-carrying ones (K-FAC's tokens) or all of them.
    """

    def __init__(self, d_in: int, d_out: int, r: int, oversample: int, identity: bool, generator, device):
        k = min(r + oversample, d_in, d_out)
        l = min(2 * k + 1, d_out)
        self.r, self.identity = r, identity
        self.Omega = torch.randn(d_in, k, generator=generator).to(device)          # (d_in, k)
        self.Psi = torch.randn(l, d_out, generator=generator).to(device)           # (l, d_out)
        self.Y = torch.zeros(d_out, k, device=device)
        self.W = torch.zeros(l, d_in, device=device)
        self.s = torch.zeros(d_in, device=device)
        self.gamma = torch.zeros(d_out, device=device)
        self.n_loss_tokens = 0                      # N: the label tokens G averages over
        self.n_tokens = 0                           # the tokens s and γ average over

    @torch.no_grad()
    def update(self, x: torch.Tensor, g: torch.Tensor, factor_rows: torch.Tensor | None, n_loss_tokens: int) -> None:
        """x (n, d_in) inputs and g (n, d_out) = ∂L_b/∂y of every position, L_b the batch's mean loss over its
        n_loss_tokens label tokens, so the per-token gradients are ĝ = n_loss_tokens · g (the factor multiplies the
        small products, not g). factor_rows: indices of the rows s and γ average over (None: all n rows)."""
        x, g, N = x.float(), g.float(), n_loss_tokens
        self.Y.addmm_(g.T, x @ self.Omega, alpha=N)                 # Σ ĝ (xᵀ Ω)  →  N · G Ω      (d_out, k)
        self.W.addmm_((g @ self.Psi.T).T, x, alpha=N)               # Σ (Ψ ĝ) xᵀ  →  N · Ψ G      (l, d_in)
        self.n_loss_tokens += N
        if factor_rows is not None:
            x, g = x.index_select(0, factor_rows), g.index_select(0, factor_rows)     # (n', d_in), (n', d_out)
        if not self.identity:
            self.s += (x * x).sum(0)
            self.gamma.add_((g * g).sum(0), alpha=N ** 2)
        self.n_tokens += x.shape[0]

    def factors(self, rel_damping: float):
        """(U, σ, V, S^{-½}, Γ^{-½}) of the whitened gradient, S and Γ diagonal and damped (None, None: identity)."""
        import curvature as C
        N, n = self.n_loss_tokens, self.n_tokens
        if self.identity:
            U, sigma, V = C.sketch_svd(self.Y / N, self.W / N, self.Psi, self.r)
            return U, sigma, V, None, None
        s_is = C.damped_inverse_sqrt(self.s / n, rel_damping)                       # (d_in,)
        g_is = C.damped_inverse_sqrt(self.gamma / n, rel_damping)                   # (d_out,)
        Y_M = g_is[:, None] * (self.Y / N)                                          # M Ω'
        W_M = (self.W / N) * s_is[None, :]                                          # Ψ' M
        U, sigma, V = C.sketch_svd(Y_M, W_M, self.Psi / g_is[None, :], self.r)     # Ψ' = Ψ D_γ^{½}
        return U, sigma, V, s_is, g_is

    def bytes(self) -> int:
        return sum(t.numel() * 4 for t in (self.Omega, self.Psi, self.Y, self.W, self.s, self.gamma))


def _sketch_hooks(layers: dict, sketches: dict, state: dict) -> list:
    """Forward hooks that feed each layer's sketch once the output gradient arrives (so checkpoint recomputation,
    whose outputs get no gradient, is never counted). state["rows"] (the rows of the factors, None = all) and
    state["N"] (label tokens of the mean loss) describe the batch."""
    def make(name):
        def forward_hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x, rows, N = inputs[0].detach().flatten(0, -2), state["rows"], state["N"]

            def grad_hook(grad):                                   # mean loss: per-token ĝ = N · ∂L/∂y
                sketches[name].update(x, grad.detach().flatten(0, -2), rows, n_loss_tokens=N)
            output.register_hook(grad_hook)
        return forward_hook
    return [layer.register_forward_hook(make(name)) for name, layer in layers.items()]


def positions_up_to_last_label(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at every position up to the last label of its row — the positions whose outputs reach a
    label token's prediction under causal attention (the ones after it are padding)."""
    return (labels != -100).flip(1).cumsum(1).flip(1) > 0


def cg_calibration_factors(model: nn.Module, layers: dict, batches, cfg: AdapterConfig, mode: str, generator):
    """{name: (U, σ, V, S^{-½}, Γ^{-½})} of the whitened gradient of every adapted layer, and the extra bytes held.

    One pass over the calibration batches. G = ∂L/∂W of the mean loss over all their label tokens — the true
    gradient: prompt positions contribute through attention, so it is *not* the K-FAC "grad" statistic restricted to
    label tokens —, S and Γ (full or diagonal) over the label tokens as K-FAC defines them, or with
    --cg-factor-tokens all over every position up to the last label of its row (None, None: identity).
    dense:  G from autograd, S, Γ from curvature.KFACCollector; dense top-r SVD of M = Γ^{-½} G S^{-½} per layer.
            Extra memory: one fp32 copy of the adapted weights (+ full factors).
    sketch: DiagWhitenedSketch per layer, O((d_in + d_out)·r) extra memory each.
    The adapters are still zero (B = 0, no shift buffers yet), so the pass runs the layers as their base linears
    (the `merged` flag: W0 + ΔW = W0 is exact) and skips the adapter path's matmuls, additions and saved tensors.
    """
    import curvature as C
    for name, layer in layers.items():
        if layer.merged or layer.lora_factors()[1].any():
            raise RuntimeError(f"CG-LoRA calibrates zero adapters, but {name} is merged or has B ≠ 0 "
                               "(calibrate once, right after apply_method)")
    weights = [m.weight for m in layers.values()]
    if mode != "dense" and hasattr(model, "model") and hasattr(model.model, "layers"):
        # the sketch only needs ∂L/∂y at the layer outputs: ask for the gradient of the first block's norm weight, so
        # backward reaches every layer output but computes no weight gradient (≈ 1/3 of a linear's fwd+bwd FLOPs)
        weights = [model.model.layers[0].input_layernorm.weight]
    flags = [w.requires_grad for w in weights]
    stats = {"kfac-full": ["full"], "kfac-diag": ["diag"], "identity": []}[cfg.cg_curvature]
    collector = C.KFACCollector(layers, stats) if mode == "dense" and stats else None
    device = weights[0].device
    if mode == "dense":
        G = {n: torch.zeros(m.out_features, m.in_features, device=device) for n, m in layers.items()}
        handles = []
    else:
        sketches = {n: DiagWhitenedSketch(m.in_features, m.out_features, cfg.r, cfg.cg_oversample,
                                          cfg.cg_curvature == "identity", generator, device)
                    for n, m in layers.items()}
        state = {}
        handles = _sketch_hooks(layers, sketches, state)
    n_total = 0
    try:
        for layer in layers.values():
            layer.merged = True                                      # ΔW = 0: forward is the base linear alone
        if collector is not None:
            collector.__enter__()
        for w in weights:
            w.requires_grad_(True)                                   # so gradients reach the layers
        for inputs, labels in batches:
            mask = labels != -100
            N = int(mask.sum())
            factor_mask = mask if cfg.cg_factor_tokens == "labels" else positions_up_to_last_label(labels)
            if collector is not None:
                collector.set_batch(factor_mask, reduction="mean", n_loss_tokens=N)
            if mode != "dense":
                rows = None if bool(factor_mask.all()) else factor_mask.flatten().nonzero().squeeze(1)
                state.update(rows=rows, N=N)
            logits = model.label_logits(inputs, mask).float()                          # (N, vocab)
            grads = torch.autograd.grad(F.cross_entropy(logits, labels[mask]), weights)
            if mode == "dense":
                for (n, _), g in zip(layers.items(), grads):
                    G[n].add_(g, alpha=N)                                              # Σ over tokens
            # (sketch mode: the output-gradient hooks have fed every layer's sketch during this backward)
            n_total += N
            del logits, grads
    finally:
        for layer in layers.values():
            layer.merged = False
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        for h in handles:
            h.remove()
        if collector is not None:
            collector.__exit__(None, None, None)
    out, extra = {}, 0
    if mode == "dense":
        factors = collector.factors() if collector is not None else {}
        for name, layer in layers.items():
            Gn = G.pop(name).div_(n_total)                                             # (d_out, d_in)  ∂L/∂W
            if cfg.cg_curvature == "identity":
                S, Gamma, damping = None, None, 0.0
            elif cfg.cg_curvature == "kfac-diag":
                S, Gamma, damping = factors[name].s, factors[name].gamma, cfg.cg_damping
            else:
                S, Gamma, damping = factors[name].S, factors[name].Gamma, cfg.cg_damping
            extra += Gn.numel() * 4 + sum(t.numel() * 4 for t in (S, Gamma) if t is not None)
            w = C.whitened_svd_init(Gn, S, Gamma, cfg.r, kappa0=1.0, rel_damping=damping, svd=cfg.cg_dense_svd,
                                    generator=generator)
            inv = [None if t is None else C.damped_inverse_sqrt(t, damping) for t in (S, Gamma)]
            out[name] = (w.U, w.sigma, w.V, *inv)
        return out, extra
    for name, sk in sketches.items():
        out[name] = sk.factors(cfg.cg_damping)
        extra += sk.bytes()
    return out, extra


@torch.no_grad()
def cg_measured_step_size(model: nn.Module, batch, set_step: Callable[[float], None], kappa0: float,
                          eta0: float) -> tuple[float, list[tuple[float, float]]]:
    """η whose initial step has *measured* KL κ₀ (this project's reconstruction, not the paper's; SPEC §6 sets η
    from the K-FAC *predicted* KL, which runs low — notes/cg_lora.md):

        κ(η) = mean over the label tokens t of one calibration batch of KL(p_base,t ‖ p_η,t),   solve κ(η) = κ₀

    p_base: the model with the adapters at zero, p_η: with the step of size η (set_step(η) writes the factors).
    Only no-grad forwards, started from the predicted η0; curvature.solve_step_size takes secant steps on log κ
    against log η (κ ∝ η² for small steps), at most 12 forwards, and never beyond 10× the predicted η (the K-FAC
    prediction runs low, so a larger η is rarely needed, and a KL that saturates below κ₀ would otherwise inflate
    the factors without end; calibrate() warns when κ₀ was not reached). Returns (η, [(η_i, κ_i) per forward]).
    """
    import curvature as C
    inputs, labels = batch
    mask = labels != -100
    was_training = model.training
    model.eval()
    try:
        set_step(0.0)
        base = F.log_softmax(model.label_logits(inputs, mask).float(), dim=-1)       # (N, vocab)
        p_base = base.exp()
        evals = []

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


class CGShiftLinear(LoRALinear):
    """CG-LoRA's "shift" variant without touching W0: the initial step c·B₀A₀ is kept in buffers and subtracted,

        y = W0 x + c·B(A x) − c·B₀(A₀ x)      (= (W0 − c B₀A₀) x + c B A x, the shifted model, unchanged at init)

    so the base checkpoint stays the base (resume and merges need nothing else), and the adapter exports to peft as
    an exact rank-2r LoRA: A' = [A; A₀], B' = [B, −B₀].
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)
        device = base.weight.device
        self.register_buffer("lora_A0", torch.zeros(r, self.in_features, device=device))
        self.register_buffer("lora_B0", torch.zeros(self.out_features, r, device=device))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().adapter_forward(x) - self.scale * F.linear(F.linear(x, self.lora_A0), self.lora_B0)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (torch.cat([self.lora_A, self.lora_A0]), torch.cat([self.lora_B, -self.lora_B0], dim=1), self.scale)


class CGLoRAHooks(MethodHooks):
    """CG-LoRA: a LoRA whose (A, B) start as the curvature-whitened Newton-like step (SPEC §6), then plain LoRA.

        calibrate(batches)   G, S, Γ over --cg-batches batches; M = Γ^{-½} G S^{-½}; top-r SVD per layer; then
                             one global step size η for the step ΔW = −η Γ^{-½} [M]_r S^{-½} of every layer:
                               predicted: ½ η² Σ_ℓ ‖[M_ℓ]_r‖²_F = κ₀ (the K-FAC predicted KL of the whole step,
                                          K-FAC being block-diagonal over layers) — SPEC §6
                               measured:  the measured KL(base ‖ init) on the first calibration batch = κ₀, from
                                          the predicted η by a few no-grad forwards (cg_measured_step_size; ours)
                             B₀ = −√(η/c) Γ^{-½} U_r Σ_r^{½}, A₀ = √(η/c) Σ_r^{½} V_rᵀ S^{-½}, then rebalanced
                             per direction by --cg-split (B₀D, D⁻¹A₀: the same product)
                             no-shift: keep W₀ (the model starts one whitened step ahead — the paper's best variant)
                             shift:    W₀ − c B₀ A₀ as the base (the function is unchanged at init, as LoRA-GA
                                       does), implemented by CGShiftLinear without modifying W₀
    Everything after calibration is LoRA (the other hooks do nothing).
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        super().__init__(model, cfg)
        self.calibration_batches = cfg.cg_batches

    def calibrate(self, batches) -> dict:
        import time
        import curvature as C
        cfg = self.cfg
        layers = adapter_layers(self.model)
        n_weights = sum(m.in_features * m.out_features for m in layers.values())
        dense_bytes = 4 * n_weights                                 # G alone, fp32, for every adapted layer
        mode = cfg.cg_mode
        if mode == "auto":
            fits = dense_bytes <= cfg.cg_memory_cap_mb * 2 ** 20
            mode = "dense" if fits or cfg.cg_curvature == "kfac-full" else "sketch"
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        svds, extra = cg_calibration_factors(self.model, layers, batches, cfg, mode, generator)
        t_directions = time.perf_counter() - t0
        eta_predicted = C.predicted_step_size(torch.cat([s for (_, s, _, _, _) in svds.values()]), cfg.cg_kappa0)

        @torch.no_grad()
        def set_step(eta: float) -> None:                            # c·B A = −η Γ^{-½} [M]_r S^{-½} in every layer
            for name, layer in layers.items():
                U, sigma, V, s_is, g_is = svds[name]
                B0, A0 = C.lora_factors_for_step(U, sigma, V, s_is, g_is, eta, layer.scale, cfg.cg_split)
                layer.lora_A.copy_(A0)
                layer.lora_B.copy_(B0)

        eta, info = eta_predicted, {}
        if cfg.cg_kappa_source == "measured":
            eta, evals = cg_measured_step_size(self.model, batches[0], set_step, cfg.cg_kappa0, eta_predicted)
            info = {"cg_kl_measured": dict(evals)[eta], "cg_kl_at_predicted_eta": evals[0][1],
                    "cg_kl_forwards": len(evals), "cg_kl_evals": [[e, k] for e, k in evals]}
        set_step(eta)
        if cfg.cg_variant == "shift":                                 # subtract the same step: f unchanged
            with torch.no_grad():
                for layer in layers.values():
                    layer.lora_A0.copy_(layer.lora_A)
                    layer.lora_B0.copy_(layer.lora_B)
        self.info = {"cg_mode": mode, "cg_eta": eta, "cg_eta_predicted": eta_predicted, **info,
                     "cg_init_s": time.perf_counter() - t0, "cg_directions_s": t_directions,
                     "cg_extra_mb": extra / 2 ** 20, "cg_dense_grad_mb": dense_bytes / 2 ** 20}
        measured = (f"; measured KL {info['cg_kl_measured']:.3g} ({info['cg_kl_forwards']} forwards; "
                    f"{info['cg_kl_at_predicted_eta']:.3g} at the predicted η {eta_predicted:.3g})" if info else "")
        if info and abs(math.log(max(info["cg_kl_measured"], 1e-30) / cfg.cg_kappa0)) > math.log(1.1):
            measured += (f" — WARNING: the measured KL did not reach --cg-kappa0 {cfg.cg_kappa0:g} (it may saturate "
                         f"below it on this model); consider a smaller --cg-kappa0")
        print(f"cg-lora init ({mode}, {cfg.cg_curvature}, {cfg.cg_variant}, {cfg.cg_kappa_source}): η = {eta:.3g} "
              f"for κ₀ = {cfg.cg_kappa0}{measured}, {self.info['cg_init_s']:.1f}s, extra memory "
              f"{self.info['cg_extra_mb']:.1f} MiB", file=sys.stderr)
        return self.info


# method name -> hooks class; a method without an entry uses the no-op MethodHooks
METHOD_HOOKS: dict[str, type[MethodHooks]] = {"lora": MethodHooks, "adalora": AdaLoRAHooks, "triadapt": TriAdaptHooks,
                                              "ctr": CTRLoRAHooks, "cg": CGLoRAHooks}


def training_hooks(model: nn.Module, cfg: AdapterConfig) -> MethodHooks:
    """The hooks object of cfg.method for a model that already has its adapters (apply_method first)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown adapter method {cfg.method!r}; known methods: {', '.join(METHODS)}")
    return METHOD_HOOKS.get(cfg.method, MethodHooks)(model, cfg)


# -----------------------------------------------------------------------------
# 6. Save / load / export


def _write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_adapter(model: nn.Module, cfg: AdapterConfig, out_dir: str) -> None:
    """Write `adapter.safetensors` (adapter tensors only) and `adapter_config.json` (method, config, ranks).

    "ranks" are the shape ranks load_adapter needs (LoRA r, AdaLoRA r₀, TriAdaptLoRA grown rank); "active_ranks" are
    the ranks in use (adapter_ranks: AdaLoRA's kept triplets) for heatmaps and reports.

    Both files are written atomically; the config is written last, so a folder with a config is complete.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save; call apply_method first")
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS_NAME), adapter_state_dict(model), {"format": "pt"})
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG_NAME), {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "ranks": {name: layer.rank for name, layer in layers.items()},  # shape ranks: what load needs to rebuild
        "active_ranks": adapter_ranks(model),  # ranks in use (AdaLoRA: kept triplets), for plots and reports
    })


def _read_adapter_config(path: str) -> tuple[AdapterConfig, dict[str, int]]:
    """Read and validate this project's adapter_config.json -> (config, per-module ranks)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} at {path}; is this an adapter folder written by "
                                f"save_adapter?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    known, optional = ["format_version", "method", "config", "ranks"], ["active_ranks"]
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    unknown = [k for k in meta if k not in known + optional]
    missing = [k for k in known if k not in meta]
    if unknown or missing:
        raise ValueError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; expected {known}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']!r} is not supported (expected "
                         f"{FORMAT_VERSION})")
    try:
        cfg = AdapterConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if meta["method"] != cfg.method:
        raise ValueError(f"{path}: 'method' is {meta['method']!r} but config.method is {cfg.method!r}")
    for key in ("ranks", "active_ranks"):
        if key in meta and not _has_type(meta[key], dict[str, int]):
            raise ValueError(f"{path}: {key!r} must map module names to int ranks")
    return cfg, meta["ranks"]


def load_adapter(model: nn.Module, adapter_dir: str) -> AdapterConfig:
    """Build the adapter described by `adapter_dir` into a base `model` and load its tensors, strictly.

    Any missing, unexpected or mis-shaped tensor is an error listing them; on error the plain nn.Linear layers are
    put back (parameters stay frozen). Returns the adapter's config. Only adapter parameters are left trainable.
    """
    cfg, ranks = _read_adapter_config(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME))
    if not os.path.exists(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_dir}")
    apply_method(model, cfg.method, cfg, ranks=ranks)
    try:
        load_adapter_weights(model, adapter_dir)
    except ValueError:
        remove_adapters(model)
        raise
    return cfg


def load_adapter_weights(model: nn.Module, adapter_dir: str) -> None:
    """Copy `adapter_dir/adapter.safetensors` into a model that already has the matching adapters (e.g. on resume).

    Strict: a one-line ValueError lists missing, unexpected and mis-shaped tensors; nothing is copied in that case.
    TriAdaptLoRA layers are first grown to the per-module ranks recorded in `adapter_dir/adapter_config.json`
    (growth leaves the function unchanged; on resume train.py has already replayed the growth through
    TriAdaptHooks.restore_structure, so that the new tensors are in the optimizer, and this is a no-op).
    """
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    layers = adapter_layers(model)
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    if any(isinstance(m, TriAdaptLinear) for m in layers.values()) and os.path.exists(config_path):
        _, saved_ranks = _read_adapter_config(config_path)
        for name, layer in layers.items():
            if isinstance(layer, TriAdaptLinear) and saved_ranks.get(name, 0) > layer.rank:
                layer.grow_to(saved_ranks[name])
    expected = adapter_state_dict(model)
    if not expected:
        raise ValueError("model has no adapters to load weights into; use load_adapter on a base model instead")
    with safe_open(weights_path, framework="pt") as f:
        if any(_OLD_TRI_BLOCK.match(k) for k in f.keys()):  # TriAdaptLoRA blocks one by one (before 2026-11-24)
            tensors = _tri_blocks_to_whole({k: f.get_tensor(k) for k in f.keys()}, weights_path)
            get, saved_shapes = tensors.__getitem__, {k: tuple(v.shape) for k, v in tensors.items()}
        else:
            get, saved_shapes = f.get_tensor, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        problems = _state_dict_problems({k: tuple(v.shape) for k, v in expected.items()}, saved_shapes)
        if problems:
            raise ValueError(f"{weights_path} does not fit the model's adapters: {problems}")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(get(key))  # casts to the adapter dtype, moves to the model's device


_OLD_TRI_BLOCK = re.compile(r"^(.*)\.tri_([ABRK])\.(\d+)$")


def _tri_blocks_to_whole(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Adapter files written before 2026-11-24 hold each TriAdaptLoRA block as a tensor of its own: `….tri_A.n` = a_n,
    `….tri_B.n` = b_n (d_out×k), `….tri_R.n` = R_n, `….tri_K.n` = K_{n+1}. Join them into the whole factors
    TriAdaptLinear stores now (tri_A_all, tri_Bt_all, tri_C_all); other tensors pass through."""
    out, modules = {}, {}
    for key, t in tensors.items():
        m = _OLD_TRI_BLOCK.match(key)
        if m:
            modules.setdefault(m[1], {}).setdefault(m[2], {})[int(m[3])] = t
        else:
            out[key] = t
    for prefix, parts in modules.items():
        a, b, R, K = ([parts.get(kind, {}).get(n) for n in range(len(parts.get(kind, {})))] for kind in "ABRK")
        if not a or not len(a) == len(b) == len(R) or len(K) != len(R) - 1 or None in a + b + R + K:
            raise ValueError(f"{path}: the TriAdaptLoRA blocks of {prefix} are incomplete (tri_A, tri_B, tri_R: one "
                             f"per block, tri_K: one fewer); is the file truncated?")
        out[f"{prefix}.tri_A_all"] = torch.cat(a)
        out[f"{prefix}.tri_Bt_all"] = torch.cat(b, dim=1).t().contiguous()
        out[f"{prefix}.tri_C_all"] = torch.cat([R[0].flatten()] + [x.flatten() for n in range(1, len(R))
                                                                    for x in (R[n], K[n - 1])])
    return out


def _state_dict_problems(expected: dict[str, tuple], found: dict[str, tuple], show: int = 5) -> str:
    """One line listing missing / unexpected / mis-shaped keys ("" if none)."""
    def listing(items):
        return ", ".join(items[:show]) + (f" (+{len(items) - show} more)" if len(items) > show else "")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k} {list(found[k])} != expected {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {listing(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {listing(misshaped)}")
    return "; ".join(parts)


def _json_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def export_peft(model: nn.Module, cfg: AdapterConfig, out_dir: str,
                base_model_name_or_path: str | None = None) -> None:
    """Write the adapter in HF peft's LoRA format: `adapter_model.safetensors` + `adapter_config.json`.

    Keys are `base_model.model.<module path>.lora_A.weight` (r, d_in) and `.lora_B.weight` (d_out, r) — the adapter
    name ("default") is not part of saved keys. peft scales by lora_alpha / r per module, so each module m is written
    with rank r_m and alpha_m = scale_m · r_m; the most common (r, alpha) become `r` / `lora_alpha` and modules that
    differ go into `rank_pattern` / `alpha_pattern` (keys are full module paths, which peft matches as
    `(.*\\.)?<key>$`). Every method exports through its `lora_factors()` (A, B, scale).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to export; call apply_method first")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        A, B, scale = layer.lora_factors()  # (r, d_in), (d_out, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        ranks[name] = A.shape[0]
        alphas[name] = _json_number(scale * A.shape[0])
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "rank_pattern": {name: rm for name, rm in ranks.items() if rm != r},
        "alpha_pattern": {name: am for name, am in alphas.items() if am != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, PEFT_WEIGHTS_NAME), tensors, {"format": "pt"})
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG_NAME), peft_config)
