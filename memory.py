"""
How much memory a fine-tuning run needs, from the model's shape alone (no weights are loaded).

    python memory.py --model llama-7b --method ctr --seq-len 2048 --rank 16 --grad-checkpoint
    python memory.py --table        # the notes/memory.md table: Llama-2-7B, Llama-2-13B, Llama-3-8B
    python benchmarks/memory_validation.py   # estimate vs measured peak RSS of small CPU runs
                                             # (notes/memory.md)
    python train.py ... --dry-run   # the same report for a training command line (dry_run_report)

Every figure is a count of bytes derived from shapes — L layers, width d, MLP width d_ff,
vocabulary V, heads H, key/value heads n_kv, head size hd, rank r, batch B, sequence T,
N = label tokens — for *this* implementation:

    weights         every parameter of model.py's Llama, in the storage dtype
                    (fp32 for --method full)
    adapters        the adapter tensors of adapters.py (fp32), with their buffers
    gradients       one fp32 gradient per trainable parameter
    optimizer       fused AdamW: exp_avg and exp_avg_sq, 2 fp32 per trainable parameter
    method state    AdaLoRA's sensitivity EMAs, CTR-LoRA's K-FAC statistics,
                    CG-LoRA's calibration pass
    weight copies   cast copies of frozen weights that autograd keeps: autocast's bf16 casts of
                    fp32 weights, or model.call_in_dtype's fp32 copies of bf16 weights
                    (bf16 storage, fp32 compute)
    activations     what autograd saves for backward, counted tensor by tensor by replaying
                    model.py's forward on symbolic tensors (section 3) — with and without
                    gradient checkpointing
    logits          the (N, V) fp32 log-probabilities cross_entropy saves, and their two
                    gradients in backward

The total is the *peak over the phases of a step* (head backward, block backward, optimizer
step; CG-LoRA's calibration pass), not the sum of the lines: e.g. the gradients of the logits
are gone before the first block is recomputed. It is validated against the measured peak RSS of
small CPU runs (benchmarks/memory_validation.py, tests/test_memory.py, notes/memory.md).

Read top to bottom: 1. shapes and parameter counts, 2. adapters and method state, 3. the
symbolic forward (activations), 4. estimate(), 5. the report (train.py --dry-run), 6. command
line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

import adapter_config as AC
import adapters as A
import curvature as C
import model as M

GiB, MiB, KiB = 2 ** 30, 2 ** 20, 2 ** 10
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
ALL_METHODS = ["lora", "adalora", "triadapt", "ctr", "cg", "full"]


def human(n: float) -> str:
    """Bytes in GiB / MiB / KiB (binary units, as nvidia-smi and torch.cuda report them)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------------
# 1. Shapes and parameter counts
# --------------------------------------------------------------------------------------------------

def model_shape(name: str) -> tuple[M.LlamaConfig, str]:
    """(config, where it came from) without touching any weight file.

    A checkpoint folder (a path, or a name under checkpoints/ as model.resolve_checkpoint finds
    it) gives its config.json; otherwise the preset of that name (llama-7b -> llama2-7b ...).
    Only config.json is ever read.
    """
    canonical = M.ALIASES.get(name, name)
    if (canonical == "smollm2-135m" and not Path(name).is_dir()
            and not (M.DEFAULT_MODEL_DIR / "config.json").is_file()):
        # resolve_checkpoint would convert the GGUF
        return M.preset_config(canonical), f"preset {canonical}"
    try:
        folder = M.resolve_checkpoint(name)
    except M.CheckpointError:
        if canonical in M.PRESETS:
            return M.preset_config(canonical), f"preset {canonical} (no checkpoint on disk)"
        raise
    return M.LlamaConfig.from_json(folder / "config.json"), str(folder / "config.json")


def linear_shapes(cfg: M.LlamaConfig) -> dict[str, tuple[int, int]]:
    """{leaf name: (d_in, d_out)} of the seven linears of one block (model.Attention, model.MLP)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def block_param_count(cfg: M.LlamaConfig) -> int:
    """Parameters of one block: 7 linears (+ biases if the config has them) + 2 RMSNorm weights."""
    n = sum(i * o for i, o in linear_shapes(cfg).values()) + 2 * cfg.hidden_size
    shapes = linear_shapes(cfg)
    if cfg.attention_bias:
        n += sum(shapes[k][1] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if cfg.mlp_bias:
        n += sum(shapes[k][1] for k in ("gate_proj", "up_proj", "down_proj"))
    return n


def head_param_count(cfg: M.LlamaConfig) -> int:
    """lm_head (V·d) unless tied to the embedding."""
    return 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size


def model_param_count(cfg: M.LlamaConfig) -> int:
    """Embedding V·d + L blocks + final norm d + lm_head (untied)."""
    return (cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * block_param_count(cfg)
            + cfg.hidden_size + head_param_count(cfg))


# --------------------------------------------------------------------------------------------------
# 2. Adapters and method state (from adapters.py's layer classes and hooks)
# --------------------------------------------------------------------------------------------------

def triadapt_final_rank(acfg: A.AdapterConfig) -> int:
    """The rank every TriAdaptLoRA module is budgeted at: the reference rank r_ref, reached from
    tri_init_rank in blocks of tri_block. Growth is global (the budget is r_ref × modules), so
    single modules can end above r_ref and others below; the estimate budgets the uniform final
    structure (same total rank, so the same adapter parameter count to within the r² core
    terms)."""
    init = AC.triadapt_init_rank(acfg)
    return init + acfg.tri_block * ((acfg.r - init) // acfg.tri_block)


@dataclass
class AdapterShape:
    """One method's adapter on one linear (d_in -> d_out): what it stores and trains
    (adapters.py section 2)."""
    kind: str          # "lora" | "svd" | "tri" (structure of the forward)
    r: int             # rank of the stored factors (LoRA r, SVD r₀, TriAdaptLoRA final rank)
    params: int        # trainable entries (fp32)
    buffers: int       # buffer bytes (mask, CG shift buffers)
    grown: bool = False  # TriAdaptLoRA with more than one block: A, B, C are concatenated copies
    shift: bool = False  # CG-LoRA "shift": the buffers A₀, B₀ also run in the forward


def adapter_shape(method: str, acfg: A.AdapterConfig, d_in: int, d_out: int) -> AdapterShape:
    if method in ("lora", "cg"):
        r = acfg.r
        shift = method == "cg" and acfg.cg_variant == "shift"
        return AdapterShape("lora", r, r * (d_in + d_out), 4 * r * (d_in + d_out) if shift else 0,
                            shift=shift)
    if method in ("adalora", "ctr"):
        # P (d_out×r₀), λ (r₀), Q (r₀×d_in); mask (r₀)
        r0 = AC.svd_ranks(acfg)[0]
        return AdapterShape("svd", r0, r0 * (d_in + d_out + 1), 4 * r0)
    if method == "triadapt":
        # A (r×d_in), B (d_out×r), strips of C: r²
        r = triadapt_final_rank(acfg)
        grown = r > AC.triadapt_init_rank(acfg)
        return AdapterShape("tri", r, r * (d_in + d_out) + r * r, 0, grown=grown)
    raise ValueError(f"unknown adapter method {method!r}")


def target_leaves(acfg: A.AdapterConfig) -> list[str]:
    unknown = [t for t in acfg.targets if t not in A.LLAMA_LINEAR_NAMES]
    if unknown:
        raise ValueError(f"the memory estimate models adapters on "
                         f"{', '.join(A.LLAMA_LINEAR_NAMES)}; "
                         f"targets {unknown} are not among them")
    return [n for n in A.LLAMA_LINEAR_NAMES if n in acfg.targets]


def adapters_per_block(cfg: M.LlamaConfig, method: str,
                       acfg: A.AdapterConfig | None) -> dict[str, AdapterShape]:
    if method == "full":
        return {}
    shapes = linear_shapes(cfg)
    return {n: adapter_shape(method, acfg, *shapes[n]) for n in target_leaves(acfg)}


def method_state_bytes(cfg: M.LlamaConfig, method: str, acfg,
                       per_block: dict[str, AdapterShape]) -> dict[str, int]:
    """Persistent method state, and the extra held during the optimizer step (bytes, whole model).

    adalora: SensitivityScores keeps Ī and Ū for every adapter entry: 2 × 4 bytes per adapter
             parameter.
    ctr:     per module adapters.curvature_state_bytes (EMA s, γ, S̃, Γ̃, ∂L/∂λ) and as much
             again for the KFACCollector's running sums (kfac-diag/-full; the hessian metric
             keeps its diagonal only); during the step the trust region holds a snapshot of
             (P, λ, Q) and the proposed step δθ: 2 × 4 per parameter (its logits and its
             check forward: _estimate's "trust-region check" phase).
    others:  nothing (TriAdaptLoRA's importance is one float per module; CG-LoRA is plain LoRA
             after calibration).
    """
    L = cfg.num_hidden_layers
    shapes = linear_shapes(cfg)
    n_params = L * sum(a.params for a in per_block.values())
    state = step_extra = 0
    if method == "adalora":
        state = 2 * 4 * n_params
    elif method == "ctr":
        for name, a in per_block.items():
            d_in, d_out = shapes[name]
            ema = A.curvature_state_bytes(d_in, d_out, a.r, acfg.ctr_metric)
            sums = 0 if acfg.ctr_metric == "hessian" else ema - 4 * a.r  # collector: no ∂L/∂λ
            state += L * (ema + sums)
        step_extra = 2 * 4 * n_params
    return {"state": state, "step_extra": step_extra}


# --------------------------------------------------------------------------------------------------
# 3. Activations: model.py's forward replayed on symbolic tensors
# --------------------------------------------------------------------------------------------------
#
# A symbolic tensor knows its element count, element size and whether it requires grad. Each
# function below mirrors one function of model.py / adapters.py and records what autograd saves
# for backward, with PyTorch's rules: an op saves an input only if the *other* operand's gradient
# needs it (F.linear saves x iff W requires grad, W iff x does); autocast casts linear/SDPA
# inputs to bf16 (a new tensor unless already bf16; casts of trainable leaf weights are cached);
# SDPA saves q, k, v, out and an fp32 logsumexp (B, H, T). A tensor saved twice is counted once.
# tests/test_memory.py checks the count against torch.autograd.graph.saved_tensors_hooks on real
# tiny models, for every method and dtype mode.

@dataclass(eq=False)
class Sym:
    numel: int
    size: int                 # bytes per element
    rg: bool                  # requires grad

    @property
    def nbytes(self) -> int:
        return self.numel * self.size


@dataclass
class Ctx:
    """The dtype mode of a forward, and what it saved. `saved` maps id -> (tensor, bucket)."""
    autocast: bool            # torch.autocast(bf16) around the forward (train.py on CUDA)
    weight_size: int          # bytes per element of the weights as the layers see them
    # model.call_in_dtype: every frozen bf16 weight is cast to fp32 per block call
    weight_copy: bool
    full: bool                # every weight trainable (--method full)
    # adapter dropout: 1 = CUDA (bool mask), 4 = CPU (mask in the input's dtype), 0 = none
    dropout_mask: int = 0
    saved: dict = field(default_factory=dict)

    def save(self, t: Sym | None, bucket: str = "activations"):
        if t is not None:
            self.saved.setdefault(id(t), (t, bucket))

    def total(self, bucket: str | None = None) -> int:
        return sum(t.nbytes for t, b in self.saved.values() if bucket is None or b == bucket)


def _bf16(t: Sym) -> Sym:
    """autocast's cast of a linear/SDPA input to bf16: the same tensor if already bf16, else a
    new one."""
    return t if t.size == 2 else Sym(t.numel, 2, t.rg)


def _weight(ctx: Ctx, numel: int, trainable: bool) -> Sym | None:
    """The weight tensor a linear multiplies by: None = a parameter itself (costs nothing extra);
    else a copy (autocast's bf16 cast of an fp32 weight, or call_in_dtype's fp32 copy of a bf16
    weight)."""
    if ctx.autocast and ctx.weight_size == 4:
        return Sym(numel, 2, trainable)
    if ctx.weight_copy:
        return Sym(numel, 4, trainable)
    return None


def sym_rmsnorm(ctx: Ctx, x: Sym, n_rows: int, trainable: bool) -> Sym:
    """model.RMSNorm: x.float() (a copy if x is bf16); pow and mul save it and rsqrt (n_rows,);
    weight · x̂ saves x̂ if the weight is trainable and the weight (or its copy) if x̂ needs a
    gradient."""
    xf = x if x.size == 4 else Sym(x.numel, 4, x.rg)
    if xf.rg:
        ctx.save(xf)
        ctx.save(Sym(n_rows, 4, True))                                  # rsqrt(mean(x²) + eps)
    xn = Sym(x.numel, 4, xf.rg)
    xc = xn if x.size == 4 else Sym(x.numel, x.size, xn.rg)            # .to(dtype)
    d = x.numel // n_rows
    w = _weight(ctx, d, trainable) if not ctx.autocast else None       # autocast leaves mul alone
    if trainable:
        ctx.save(xc)
    if xc.rg and w is not None:
        ctx.save(w, "weight_copies")
    out_size = max(ctx.weight_size if not ctx.weight_copy else 4, x.size)
    return Sym(x.numel, out_size, xc.rg or trainable)


def sym_linear(ctx: Ctx, x: Sym, d_in: int, d_out: int, trainable: bool,
               adapter: AdapterShape | None = None, keep_input: bool = False) -> Sym:
    """F.linear(x, W) of a base linear (+ an adapters.AdaptedLinear's adapter path). keep_input:
    a hook holds x (CG-LoRA's sketch hooks)."""
    rows = x.numel // d_in
    if adapter is not None and (ctx.autocast or (x.size == 4 and (ctx.weight_size == 4
                                                                  or ctx.weight_copy))):
        if keep_input:
            ctx.save(x, "activations")
        return sym_fused_adapted_linear(ctx, x, rows, d_in, d_out, trainable, adapter)
    xin = _bf16(x) if ctx.autocast else x              # (reference_forward from here on)
    w = _weight(ctx, d_in * d_out, trainable)
    if trainable:
        ctx.save(xin)
    if xin.rg and w is not None:
        ctx.save(w, "weight_copies")
    out_size = 2 if ctx.autocast else (4 if ctx.weight_copy else max(x.size, ctx.weight_size))
    y = Sym(rows * d_out, out_size, xin.rg or trainable)
    if keep_input:
        ctx.save(x, "activations")
    if adapter is None:
        return y
    sym_adapter(ctx, x, rows, d_in, d_out, adapter)
    return Sym(rows * d_out, out_size, True)


def sym_fused_adapted_linear(ctx: Ctx, x: Sym, rows: int, d_in: int, d_out: int, trainable: bool,
                             a: AdapterShape) -> Sym:
    """AdaptedLinear.forward's fused path: forward_factors() builds (A, B) (parameter-sized copies
    for SVD-form, TriAdaptLoRA's B' = B C and CG shift), then adapters.LowRankLinearFunction
    casts every operand to the compute dtype (bf16 under autocast, else fp32) and saves only what
    its backward needs: x for ∂W0 (or for ∂A without dropout), the dropout output for ∂A with
    dropout, W0 (or its copy) for ∂x, A for ∂x, B always, h = A x for ∂B."""
    cd = 2 if ctx.autocast else 4
    x2 = x if x.size == cd else Sym(x.numel, cd, x.rg)                  # x.to(dtype)
    xa2 = None
    if ctx.dropout_mask:                            # nn.Dropout(x): new tensor; its mask saved
        if x.rg:                                    # for ∂x (bool on CUDA, x's dtype on CPU)
            ctx.save(Sym(x.numel, 1 if ctx.dropout_mask == 1 else x.size, False))
        xa = Sym(x.numel, x.size, x.rg)
        xa2 = xa if xa.size == cd else Sym(x.numel, cd, x.rg)
    r = 2 * a.r if a.shift else a.r

    def factor(numel: int, copy: bool) -> Sym | None:
        """A or B as the Function saves it: the parameter itself (None: costs nothing) or a copy
        (a product, cat or gather made by forward_factors, and/or autocast's bf16 cast)."""
        if ctx.autocast:
            return Sym(numel, 2, True)
        return Sym(numel, 4, True) if copy else None

    # B' = full_B() @ core(): mm saves its operands, autocast's bf16 casts or the fp32
    # concatenations of the blocks
    if a.kind == "tri" and (ctx.autocast or a.grown):
        ctx.save(Sym(d_out * r, cd, True))
        ctx.save(Sym(r * r, cd, True))
    grown_tri = a.kind == "tri" and a.grown                          # A: the concatenated blocks
    A_ = factor(r * d_in, a.kind == "svd" or a.shift or grown_tri)   # λ⊙Q / [A; A₀] / cat(a_n)
    B_ = factor(d_out * r, a.kind == "tri" or a.shift)               # B C / [B, −B₀]
    if trainable or xa2 is None:
        ctx.save(x2)
    if xa2 is not None:
        ctx.save(xa2)
    if x.rg:
        ctx.save(_weight(ctx, d_in * d_out, trainable), "weight_copies")
        ctx.save(A_)
    ctx.save(B_)
    ctx.save(Sym(rows * r, cd, True))                                    # h = A x
    return Sym(rows * d_out, cd, True)


def sym_adapter(ctx: Ctx, x: Sym, rows: int, d_in: int, d_out: int, a: AdapterShape):
    """AdaptedLinear.reference_forward's adapter path (mixed dtypes without autocast): x.to(fp32)
    (a copy if x is not fp32), dropout, adapter_forward."""
    xa = x if x.size == 4 else Sym(x.numel, 4, x.rg)
    if ctx.dropout_mask:                        # nn.Dropout: x ⊙ mask/(1−p), new tensor;
        if xa.rg:                               # the mask is saved for ∂x
            ctx.save(Sym(x.numel, ctx.dropout_mask, False))
        xa = Sym(x.numel, 4, xa.rg)
    r = a.r

    def mm(inp: Sym, n_out: int, w_numel: int, w_is_copy: bool) -> Sym:
        """F.linear(inp, W) with W an fp32 trainable adapter tensor (a parameter or its view, or
        a gather copy)."""
        if ctx.autocast:
            inp = _bf16(inp)
            if inp.rg:
                ctx.save(Sym(w_numel, 2, True))      # bf16 cast of W, needed for ∂x
        elif w_is_copy and inp.rg:
            ctx.save(Sym(w_numel, 4, True))          # the gather result, needed for ∂x
        ctx.save(inp)                                # W requires grad: ∂W needs the input
        return Sym(rows * n_out, 2 if ctx.autocast else 4, True)

    if a.kind == "lora":
        h = mm(xa, r, r * d_in, False)               # (.., r)  A x
        mm(h, d_out, d_out * r, False)               # (.., d_out)  B (A x)
        if a.shift:                                  # − c B₀(A₀ x): buffers, no gradient
            if ctx.autocast and xa.rg:
                ctx.save(Sym(r * d_in, 2, False))    # autocast casts of the buffers, saved
                ctx.save(Sym(d_out * r, 2, False))   # for ∂x
    elif a.kind == "svd":
        h1 = mm(xa, r, r * d_in, False)              # Q x
        ctx.save(h1)                                 # (Q x) ⊙ λ saves Q x for ∂λ
        h = Sym(rows * r, 4, True)                   # ⊙ λ (fp32 λ promotes a bf16 h1)
        mm(h, d_out, d_out * r, False)               # P (...)
    else:
        # TriAdaptLoRA: B (C (A x)); once grown A, C and B are concatenations of the blocks
        # (copies); with one block, the parameters themselves
        h = mm(xa, r, r * d_in, a.grown)
        z = mm(h, r, r * r, a.grown)
        mm(z, d_out, d_out * r, a.grown)


def sym_block(ctx: Ctx, cfg: M.LlamaConfig, x: Sym, B: int, T: int,
              adapters: dict[str, AdapterShape],
              first: bool, keep_inputs: bool = False, first_norm_trainable: bool = False,
              dense_weights: bool = False) -> Sym:
    """model.Block: x + attention(norm(x)), then + mlp(norm(·)). Returns the block output."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    H, hd = cfg.num_attention_heads, cfg.head_dim
    BT = B * T
    shapes = linear_shapes(cfg)
    full = ctx.full

    def lin(name: str, inp: Sym) -> Sym:
        d_in, d_out = shapes[name]
        trainable = full or (dense_weights and name in adapters)
        return sym_linear(ctx, inp, d_in, d_out, trainable, adapters.get(name),
                          keep_input=keep_inputs and name in adapters)

    n1 = sym_rmsnorm(ctx, x, BT, full or (first and first_norm_trainable))
    q, k, v = lin("q_proj", n1), lin("k_proj", n1), lin("v_proj", n1)
    cos_size = x.size if not ctx.weight_copy else 4
    q = Sym(q.numel, max(q.size, cos_size), q.rg)          # apply_rope: q·cos + rot(q)·sin
    k = Sym(k.numel, max(k.size, cos_size), k.rg)
    # GQA: SDPA (enable_gqa) reads the n_kv heads of k, v as they are: no repeated copies are
    # made or saved
    if ctx.autocast:
        q, k, v = _bf16(q), _bf16(k), _bf16(v)
    out = Sym(BT * H * hd, q.size, q.rg or k.rg or v.rg)   # SDPA output, (B, T, H·hd) in memory
    if out.rg:
        for t in (q, k, v, out):
            ctx.save(t)
        ctx.save(Sym(B * H * T, 4, True))                  # logsumexp (B, H, T), fp32
    o = lin("o_proj", out)                                 # y.transpose(1, 2).reshape: a view
    h1 = Sym(BT * d, max(x.size, o.size), x.rg or o.rg)    # residual
    n2 = sym_rmsnorm(ctx, h1, BT, full)
    g, u = lin("gate_proj", n2), lin("up_proj", n2)
    if g.rg:
        ctx.save(g)                                        # silu saves its input
    s = Sym(g.numel, g.size, g.rg)
    if u.rg:
        ctx.save(s)                                        # s ⊙ u saves each for the other
    if s.rg:
        ctx.save(u)
    p = Sym(g.numel, max(s.size, u.size), s.rg or u.rg)
    dn = lin("down_proj", p)
    return Sym(BT * d, max(h1.size, dn.size), h1.rg or dn.rg)


def block_weight_copy_bytes(cfg: M.LlamaConfig, ctx: Ctx) -> int:
    """Bytes of the cast copies of one block's frozen weights while it runs (call_in_dtype: fp32
    copies of every bf16 parameter of the block; autocast with fp32 weights: bf16 casts of the 7
    linears)."""
    if ctx.weight_copy:
        return 4 * block_param_count(cfg)
    if ctx.autocast and ctx.weight_size == 4:
        return 2 * sum(i * o for i, o in linear_shapes(cfg).values())
    return 0


@dataclass
class ForwardMemory:
    """What one forward keeps for backward (bytes), by part."""
    embed: int                  # the embedding side (token ids for a trainable embedding, cos/sin)
    blocks: list[int]           # saved tensors of each block (activations + weight copies)
    block_copies: list[int]     # of which: weight copies
    head: int                   # final norm, selected hidden states, mask, targets
                                # (not the log-probs)
    head_copies: int            # cast copy of lm_head's weight
                                # (autocast with fp32 weights, call_in_dtype)
    logprobs: int               # (N, V) fp32 log-probabilities saved by cross_entropy
    block_inputs: int           # one block's input (B, T, d): what a checkpointed block keeps
    block_input_saved: list[int]  # of each block's saved bytes, its input itself
                                  # (saved by the first RMSNorm)
    residual_size: int          # bytes per element of the residual stream


def forward_memory(cfg: M.LlamaConfig, adapters: dict[str, AdapterShape], B: int, T: int,
                   N: int, *, autocast: bool, weight_size: int, weight_copy: bool, full: bool,
                   dropout_mask: int = 0, keep_inputs: bool = False,
                   first_norm_trainable: bool = False,
                   dense_weights: bool = False) -> ForwardMemory:
    """Replay Llama.forward(idx, labels) (no checkpointing) and count what autograd saves, part
    by part."""
    ctx = Ctx(autocast=autocast, weight_size=weight_size, weight_copy=weight_copy, full=full,
              dropout_mask=dropout_mask)
    d, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    # embed_tokens(idx): a trainable embedding saves the ids (B, T) int64; call_in_dtype casts the
    # lookup to fp32
    if full:
        ctx.save(Sym(B * T, 8, False))
    residual = 4 if weight_copy else weight_size
    x = Sym(B * T * d, residual, full)
    cos_sin = Sym(2 * T * hd, residual, False)           # rope_cos_sin, shared by every block
    blocks, copies, input_saved = [], [], []
    embed = ctx.total()
    for i in range(cfg.num_hidden_layers):
        before, before_copies = ctx.total(), ctx.total("weight_copies")
        input_saved.append(x.nbytes if x.rg and x.size == 4 else 0)
        x = sym_block(ctx, cfg, x, B, T, adapters, first=i == 0, keep_inputs=keep_inputs,
                      first_norm_trainable=first_norm_trainable, dense_weights=dense_weights)
        blocks.append(ctx.total() - before)
        copies.append(ctx.total("weight_copies") - before_copies)
        if i == 0:
            ctx.save(cos_sin)                            # saved by the ropes that need ∂q, ∂k
            embed += cos_sin.nbytes
    before, before_copies = ctx.total(), ctx.total("weight_copies")
    h = sym_rmsnorm(ctx, x, B * T, full)                                 # model.norm
    ctx.save(Sym(B * T, 1, False))                                       # h[keep]: the bool mask
    hs = Sym(N * d, h.size, h.rg)
    head_w = (Sym(V * d, 2, full) if autocast and weight_size == 4 else
              Sym(V * d, 4, full) if weight_copy else None)             # lm_head's weight copy
    hin = _bf16(hs) if autocast else hs
    if full:
        ctx.save(hin)
    if hin.rg and head_w is not None:
        ctx.save(head_w, "weight_copies")
    ctx.save(Sym(N, 8, False))                                           # labels[keep] for nll_loss
    ctx.save(Sym(1, 4, False))                                           # nll_loss's total_weight
    head = ctx.total() - before
    head_copies = ctx.total("weight_copies") - before_copies
    return ForwardMemory(embed=embed, blocks=blocks, block_copies=copies,
                         head=head - head_copies, head_copies=head_copies, logprobs=N * V * 4,
                         block_inputs=B * T * d * residual, block_input_saved=input_saved,
                         residual_size=residual)


def head_backward_transient(N: int, V: int) -> int:
    """log_softmax backward holds, besides the saved log-probs, the gradient of the log-probs
    (from nll_loss, a dense (N, V) fp32 tensor) and the gradient of the logits it produces:
    2 · N·V·4 bytes."""
    return 2 * N * V * 4


def block_backward_transient(cfg: M.LlamaConfig, B: int, T: int, size: int) -> int:
    """Gradients alive inside one block's backward, beyond its saved tensors: the incoming
    residual gradient (B·T·d) and, at the MLP's product p = silu(g) ⊙ u, ∂s and ∂u created while
    ∂p is alive and p is being released: net + 2·B·T·d_ff (one fp32 block measured alone,
    d_ff = 1408, B·T = 1024: its backward rose 10.8 MiB above the saved tensors, against
    2·B·T·d_ff·4 = 11.0 MiB)."""
    return (B * T * cfg.hidden_size + 2 * B * T * cfg.intermediate_size) * size


# --------------------------------------------------------------------------------------------------
# 4. The estimate
# --------------------------------------------------------------------------------------------------

def estimate(config: M.LlamaConfig, method: str, adapter_cfg: A.AdapterConfig | None,
             batch_size: int, seq_len: int, weights_dtype: torch.dtype,
             compute_dtype: torch.dtype | None, grad_checkpoint: bool,
             label_fraction: float = 1.0, device: str | None = None,
             grad_accum: int = 1) -> dict[str, int]:
    """Bytes per component of one training step of `method` on a model of shape `config` (see the
    module doc).

    weights_dtype: storage dtype of the frozen weights (ignored for "full", which keeps fp32
    master weights, as train.py does). compute_dtype: torch.bfloat16 = autocast(bf16) around the
    forward (train.py on CUDA); torch.float32 = fp32 arithmetic (with bf16 weights:
    model.call_in_dtype's cast fp32 copy of each block); None = plain arithmetic in the storage
    dtype. label_fraction: share of the B·T positions that carry a label (the LM head runs on
    those only); 1.0 is the upper bound. device: "cpu" or "cuda" (only the dropout mask differs;
    None: cuda iff autocast).

    Keys (all bytes): weights, adapters, adapter_grads, optimizer, method_state, step_extra,
    calibration, weight_copies_no_ckpt / _ckpt, activations_no_ckpt / _ckpt, logits,
    total_no_ckpt / _ckpt, and weight_copies, activations, total for the chosen
    `grad_checkpoint`.
    """
    return _estimate(config, method, adapter_cfg, batch_size, seq_len, weights_dtype, compute_dtype,
                     grad_checkpoint, label_fraction, device, grad_accum)["bytes"]


def _estimate(cfg: M.LlamaConfig, method: str, acfg, B: int, T: int, weights_dtype, compute_dtype,
              grad_checkpoint: bool, label_fraction: float = 1.0,
              device: str | None = None, grad_accum: int = 1) -> dict:
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ALL_METHODS)}")
    full = method == "full"
    if not full and acfg is None:
        acfg = A.AdapterConfig(method=method, total_steps=100)
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    N = max(1, round(label_fraction * B * T))
    weights_dtype = torch.float32 if full else weights_dtype
    ws = BYTES[weights_dtype]
    autocast = compute_dtype == torch.bfloat16
    # call_in_dtype: bf16 storage, fp32 compute
    weight_copy = compute_dtype == torch.float32 and ws == 2
    size = 2 if autocast else (4 if weight_copy else ws)      # compute dtype of matmul outputs
    per_block = adapters_per_block(cfg, method, acfg)
    cuda = autocast if device is None else device == "cuda"
    # adapter dropout: CUDA's fused kernel saves a bool mask; on CPU, x ⊙ (mask / (1 − p)) saves
    # the fp32 factor
    dropout_mask = 0 if full or acfg.dropout == 0 else (1 if cuda else 4)

    # --- persistent: weights, adapters, gradients, optimizer state, method state
    n_weights = model_param_count(cfg)
    n_adapter = L * sum(a.params for a in per_block.values())
    n_trainable = n_weights if full else n_adapter
    weights = n_weights * ws
    adapters = 4 * n_adapter + L * sum(a.buffers for a in per_block.values())
    grads = 4 * n_trainable
    optimizer = 2 * 4 * n_trainable
    ms = (method_state_bytes(cfg, method, acfg, per_block) if not full
          else {"state": 0, "step_extra": 0})
    static = weights + adapters + optimizer + ms["state"]

    # --- what the forward saves, and the transients of backward
    fm = forward_memory(cfg, per_block, B, T, N, autocast=autocast, weight_size=ws,
                        weight_copy=weight_copy, full=full, dropout_mask=dropout_mask)
    head_transient = head_backward_transient(N, V)
    blk_transient = block_backward_transient(cfg, B, T, size)
    if method == "ctr" and acfg.ctr_metric != "hessian":      # KFACCollector's ĝ rows (fp32), ×2
        blk_transient += 2 * N * max(o for _, o in linear_shapes(cfg).values()) * 4
    saved_blocks, saved_copies = sum(fm.blocks), sum(fm.block_copies)
    one_block_copy = block_weight_copy_bytes(cfg, Ctx(autocast, ws, weight_copy, full))
    # gradients appear during backward (they are set to None after every step): those of the
    # blocks already processed, and for full fine-tuning the LM head's (V·d) from the head's
    # backward on
    block_grads = 4 * (block_param_count(cfg) if full else n_adapter // L)
    head_grads = 4 * head_param_count(cfg) if full else 0
    if full and cfg.tie_word_embeddings:
        head_grads = 4 * V * d

    # no checkpointing: everything is saved; the peak is in the head's backward (log_softmax's
    # gradients)
    act_no = fm.embed + saved_blocks - saved_copies + fm.head
    saved_no = fm.embed + saved_blocks + fm.head + fm.head_copies
    # block i's backward (i = L−1 … 0): blocks above it have freed their tensors and left their
    # gradients
    in_block_no = [fm.embed + sum(fm.blocks[:i + 1]) + blk_transient + head_grads
                   + (L - i) * block_grads
                   for i in range(L)]
    phases_no = {
        "head backward (log-softmax gradients)": static + saved_no + fm.logprobs + head_transient,
        "block backward": static + max(in_block_no),
    }
    # checkpointing: each block keeps its input; its saved tensors exist again only while it is
    # recomputed (its input, saved by its first RMSNorm, is a checkpoint input already)
    ckpt_inputs = L * fm.block_inputs
    recomputed = [fm.blocks[i] - fm.block_input_saved[i] for i in range(L)]
    in_block_ck = [fm.embed + (i + 1) * fm.block_inputs + recomputed[i] + blk_transient
                   for i in range(L)]
    act_ck = max(fm.embed + ckpt_inputs + fm.head,
                 max(a - c for a, c in zip(in_block_ck, fm.block_copies)))
    phases_ck = {
        "head backward (log-softmax gradients)": static + fm.embed + ckpt_inputs + fm.head
                                                 + fm.head_copies + fm.logprobs
                                                 + head_transient,
        # (the block's weight copies: those it saves, or all of them while it runs —
        # call_in_dtype casts them all)
        "block backward (recompute)": static + head_grads + max(
            a - c + max(c, one_block_copy) + (L - i) * block_grads
            for i, (a, c) in enumerate(zip(in_block_ck, fm.block_copies))),
    }
    if full:
        # the LM head's backward: ∂logits (N·V fp32) and ∂W_head (V·d fp32) together (the
        # log-probs are freed by then)
        lm = 4 * N * V + 4 * V * d
        phases_no["LM-head backward"] = static + saved_no + lm
        phases_ck["LM-head backward"] = (static + fm.embed + ckpt_inputs + fm.head
                                         + fm.head_copies + lm)
        # autocast caches bf16 casts of trainable weights until the forward ends
        if autocast:
            phases_ck["forward end (autocast weight cache)"] = (
                static + fm.embed + ckpt_inputs + fm.head + 2 * (n_weights - V * d)
                + fm.logprobs + N * V * 6)
    step = static + grads + ms["step_extra"]                             # clip, trust region, AdamW
    phases_no["optimizer step"] = phases_ck["optimizer step"] = step
    if method == "ctr" and acfg.ctr_trust_region:
        # the trust region keeps every micro-batch's training-forward (N, V) logits as p_before
        # from its forward to the step's end (in fp32 the forward's own logits, which the
        # cross-entropy alone would free after the forward: it saves its log-probabilities; an
        # fp32 copy of autocast's bf16 ones), then checks the step with a no-grad forward per
        # micro-batch: its fp32 logits (autocast: from a bf16 copy), and kl_divergence's five
        # fp32 temporaries over one block of rows (curvature.KL_CHUNK_ELEMENTS)
        held = 4 * N * V * grad_accum
        rows = min(N, max(1, C.KL_CHUNK_ELEMENTS // V))
        check = 4 * N * V + max(2 * N * V if autocast else 0, 5 * 4 * rows * V)
        for phases in (phases_no, phases_ck):
            for name in phases:
                phases[name] += held
            phases["trust-region check"] = step + held + check

    # --- CG-LoRA's calibration pass (before the first step: no optimizer state yet)
    calibration = 0
    if method == "cg":
        calib, calibration = cg_calibration(cfg, acfg, per_block, B, T, N, ws, weight_copy,
                                            weights + adapters, dropout_mask)
        phases_no["CG calibration"] = phases_ck["CG calibration"] = calib

    total_no, total_ck = max(phases_no.values()), max(phases_ck.values())
    copies_no, copies_ck = saved_copies + fm.head_copies, max(fm.head_copies, one_block_copy)
    out = {
        "weights": weights,
        "adapters": adapters,
        "adapter_grads": grads,
        "optimizer": optimizer,
        "method_state": ms["state"],
        "step_extra": ms["step_extra"],
        "calibration": calibration,
        "weight_copies_no_ckpt": copies_no,
        "weight_copies_ckpt": copies_ck,
        "activations_no_ckpt": act_no,
        "activations_ckpt": act_ck,
        "logits": fm.logprobs + head_transient,
        "total_no_ckpt": total_no,
        "total_ckpt": total_ck,
        "weight_copies": copies_ck if grad_checkpoint else copies_no,
        "activations": act_ck if grad_checkpoint else act_no,
        "total": total_ck if grad_checkpoint else total_no,
    }
    phases = phases_ck if grad_checkpoint else phases_no
    return {"bytes": out, "phases": phases, "peak_phase": max(phases, key=phases.get),
            "n_weights": n_weights, "n_adapter": n_adapter, "n_trainable": n_trainable,
            "forward": fm, "weights_dtype": weights_dtype, "autocast": autocast,
            "weight_copy": weight_copy, "N": N, "per_block": per_block, "acfg": acfg}


def cg_calibration_adapters(per_block: dict[str, AdapterShape]) -> dict[str, None]:
    """The adapters as forward_memory sees them during CG-LoRA's calibration pass: the layers are
    adapted (so dense mode trains their weights and sketch mode keeps their inputs) but run
    without an adapter path (ΔW = 0 there: adapters.cg_calibration_factors sets their `merged`
    flag)."""
    return {name: None for name in per_block}


def cg_calibration(cfg: M.LlamaConfig, acfg: A.AdapterConfig, per_block: dict[str, AdapterShape],
                   B: int, T: int, N: int, ws: int, weight_copy: bool, resident: int,
                   dropout_mask: int) -> tuple[int, int]:
    """(peak of the calibration pass, extra bytes of its own state) for CG-LoRA
    (adapters.cg_calibration_factors).

    dense:  G (d_out×d_in, fp32) per adapted layer for the whole pass, the weight gradients
            autograd.grad returns together at the end of each backward (storage dtype), and the
            K-FAC factors (diag: d_in + d_out; full: d_in² + d_out², counted twice: the
            collector's sums and their means)
    sketch: DiagWhitenedSketch per layer: Ω (d_in×k), Ψ (l×d_out), Y (d_out×k), W (l×d_in),
            s, γ (fp32), k = min(r + oversample, d_in, d_out), l = min(2k + 1, d_out); the
            hooks keep every adapted layer's input until its output gradient arrives.
    The pass itself runs as train.py calls it: model in eval mode (so no gradient checkpointing),
    no autocast, and with the adapted layers run as their base linears (the adapters are still
    zero: cg_calibration_adapters). The measured-KL step size afterwards (--cg-kappa-source
    measured, adapters.cg_measured_step_size) runs no-grad forwards on one batch and holds at
    most 6 (N, V) fp32 tensors at once (base log-probs and their exp, logits, log-probs, two
    elementwise temporaries), nothing saved for backward: the peak is the larger of the two
    phases.
    """
    L = cfg.num_hidden_layers
    shapes = {n: linear_shapes(cfg)[n] for n in per_block}
    n_dense = L * sum(i * o for i, o in shapes.values())
    mode = acfg.cg_mode
    if mode == "auto":
        mode = ("dense" if 4 * n_dense <= acfg.cg_memory_cap_mb * MiB
                or acfg.cg_curvature == "kfac-full" else "sketch")
    dense = mode == "dense"
    measure = 6 * 4 * N * cfg.vocab_size if acfg.cg_kappa_source == "measured" else 0
    fm = forward_memory(cfg, cg_calibration_adapters(per_block), B, T, N, autocast=False,
                        weight_size=ws, weight_copy=weight_copy,
                        full=False, dropout_mask=dropout_mask, keep_inputs=not dense,
                        first_norm_trainable=not dense, dense_weights=dense)
    # + N·V·4: cg_calibration_factors holds the fp32 logits in a local variable through
    # autograd.grad, so they are alive during the head's backward (training's forward returns
    # only the loss)
    acts = (fm.embed + sum(fm.blocks) + fm.head + fm.head_copies + fm.logprobs
            + head_backward_transient(N, cfg.vocab_size) + 4 * N * cfg.vocab_size)
    if dense:
        factors = {"identity": 0, "kfac-diag": sum(i + o for i, o in shapes.values()),
                   "kfac-full": 2 * sum(i * i + o * o for i, o in shapes.values())
                   }[acfg.cg_curvature]
        state = 4 * n_dense + 4 * L * factors
        grads_at_end = n_dense * ws
        return max(resident + state + max(acts, grads_at_end), resident + measure), state
    state = 0
    for d_in, d_out in shapes.values():
        k = min(acfg.r + acfg.cg_oversample, d_in, d_out)
        l = min(2 * k + 1, d_out)
        state += 4 * (d_in * k + l * d_out + d_out * k + l * d_in + d_in + d_out)
    state *= L
    return max(resident + state + acts, resident + measure), state


# --------------------------------------------------------------------------------------------------
# 5. The report: train.py --dry-run
# --------------------------------------------------------------------------------------------------

def run_dtypes(cfg) -> tuple[str, torch.dtype, torch.dtype, bool]:
    """(device, storage dtype, compute dtype, grad checkpointing) that train.py would use for this
    config."""
    device = torch.device(cfg.device or M.default_device())
    choice = getattr(cfg, "weights_dtype", "auto") or "auto"
    if hasattr(M, "weights_dtype_policy"):
        storage, compute = M.weights_dtype_policy(choice, device)
    else:
        storage, compute = {"auto": M.default_dtype(device), "float32": torch.float32,
                            "bfloat16": torch.bfloat16}[choice], None
    if device.type == "cuda" and choice == "auto" and not torch.cuda.is_available():
        storage = torch.bfloat16                   # previewing a GPU run here: assume a bf16 GPU
    if device.type == "cuda":
        compute = torch.bfloat16                             # train.py: autocast(bf16) on CUDA
    elif compute is None:
        compute = storage
    grad_checkpoint = (bool(cfg.grad_checkpoint) or device.type == "cuda"
                       or (device.type == "cpu" and compute != storage))
    return device.type, storage, compute, grad_checkpoint


def _adapter_config_for(cfg, method: str) -> A.AdapterConfig | None:
    """The run's adapter config with the method swapped (options of other methods are ignored by
    each method)."""
    if method == "full":
        return None
    acfg = cfg.adapter_config() if cfg.method != "full" else A.AdapterConfig(
        r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
        total_steps=getattr(cfg, "steps", 0))
    d = acfg.to_dict()
    d["method"] = method
    try:
        return A.AdapterConfig(**d)
    except ValueError:
        # a schedule option that only fits the run's own method
        return A.AdapterConfig(method=method, r=acfg.r, alpha=acfg.alpha, dropout=acfg.dropout,
                               targets=acfg.targets, total_steps=max(acfg.total_steps, 1000))


def dry_run_report(cfg) -> str:
    """The memory report of a train.TrainConfig, without loading weights (only config.json is
    read, if any)."""
    shape, source = model_shape(cfg.model)
    device, storage, compute, ckpt = run_dtypes(cfg)
    acfg = _adapter_config_for(cfg, cfg.method)
    e = _estimate(shape, cfg.method, acfg, cfg.batch_size, cfg.seq_len, storage, compute, ckpt,
                  grad_accum=cfg.grad_accum)
    b = e["bytes"]
    wname = str(e["weights_dtype"]).removeprefix("torch.")
    mode = ("autocast bf16" if e["autocast"] else
            "fp32, each block's bf16 weights cast to fp32 (call_in_dtype)" if e["weight_copy"] else
            str(compute).removeprefix("torch."))
    L, d = shape.num_hidden_layers, shape.hidden_size
    lines = [
        f"memory estimate (no weights loaded): {cfg.model} — shape from {source}",
        f"  {L} layers, d={d}, d_ff={shape.intermediate_size}, "
        f"heads {shape.num_attention_heads}/{shape.num_key_value_heads} kv, "
        f"vocab {shape.vocab_size}; {_count(e['n_weights'])} parameters",
        f"  method {cfg.method}, device {device}, weights {wname}, compute {mode}; "
        f"micro-batch {cfg.batch_size} × {cfg.seq_len} tokens "
        f"(grad-accum {cfg.grad_accum} adds memory only to CTR-LoRA's trust region: the kept "
        f"logits of every micro-batch); every position counted as a label",
    ]
    if cfg.method != "full":
        per = e["per_block"]
        ranks = sorted({a.r for a in per.values()})
        note = " (TriAdaptLoRA budgeted at its final rank)" if cfg.method == "triadapt" else ""
        lines.append(f"  adapters on {', '.join(per)} × {L} layers, "
                     f"rank {'/'.join(map(str, ranks))}{note}: "
                     f"{e['n_adapter'] / 1e6:.2f}M trainable parameters")
    rows = [
        ("weights" + (" (fp32 master weights)" if cfg.method == "full" else f" ({wname})"),
         b["weights"], None),
        ("adapters (fp32, with buffers)", b["adapters"], None),
        ("gradients of trainable parameters (fp32)", b["adapter_grads"], None),
        ("optimizer state (AdamW: 2 fp32 per trainable parameter)", b["optimizer"], None),
        ("curvature/allocator state" + _state_note(cfg.method, acfg),
         b["method_state"] + b["step_extra"] + b["calibration"], None),
        ("weight copies for compute (saved for backward)", b["weight_copies_no_ckpt"],
         b["weight_copies_ckpt"]),
        ("activations (ckpt: block inputs + one recomputed block)", b["activations_no_ckpt"],
         b["activations_ckpt"]),
        ("logits (fp32 log-probs + 2 gradients, N×V)", b["logits"], None),
        ("total (peak over the step's phases)", b["total_no_ckpt"], b["total_ckpt"]),
    ]
    lines.append(f"  {'':62s} {'no ckpt':>11s} {'grad ckpt':>11s}")
    for label, a, c in rows:
        lines.append(f"  {label:62s} {human(a):>11s} {human(c) if c is not None else '':>11s}")
    lines.append(f"  this run: gradient checkpointing {'on' if ckpt else 'off'} "
                 f"-> total {human(b['total'])} (peak in: {e['peak_phase']})")
    if cfg.method == "ctr" and acfg.ctr_metric == "hessian":
        lines.append("  not included: the Hutchinson probes' double backward "
                     "(math attention, (B, H, T, T) scores)")
    if device == "cuda":
        lines.append("  not included: the CUDA context, cuBLAS workspaces and caching-allocator "
                     "fragmentation")
    lines.append("  all methods, same settings (total; no ckpt / grad ckpt):")
    for method in ALL_METHODS:
        em = _estimate(shape, method, _adapter_config_for(cfg, method), cfg.batch_size,
                       cfg.seq_len, storage, compute, ckpt, grad_accum=cfg.grad_accum)
        bm = em["bytes"]
        mark = "  <- this run" if method == cfg.method else ""
        lines.append(f"    {method:9s} {human(bm['total_no_ckpt']):>11s} / "
                     f"{human(bm['total_ckpt']):>11s}   "
                     f"trainable {em['n_trainable'] / 1e6:9.2f}M   "
                     f"peak in: {em['peak_phase']}{mark}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _state_note(method: str, acfg) -> str:
    if method == "adalora":
        return " (sensitivity EMAs)"
    if method == "ctr":
        return f" (K-FAC {acfg.ctr_metric} + step snapshot)"
    if method == "cg":
        return " (calibration pass)"
    return ""


# --------------------------------------------------------------------------------------------------
# 6. Command line
# --------------------------------------------------------------------------------------------------

TABLE_MODELS = [("Llama-2-7B", "llama2-7b"), ("Llama-2-13B", "llama2-13b"),
                ("Llama-3-8B", "llama3-8b")]


def table(seq_len: int = 2048, batch_size: int = 1, rank: int = 16) -> str:
    """Markdown table: bf16 weights, autocast bf16 (train.py on CUDA), all seven linears adapted,
    each method."""
    out = [f"bf16 weights (fp32 master weights for full), autocast bf16, "
           f"batch {batch_size} × seq {seq_len}, "
           f"r = {rank} on all seven linears, every position a label. GiB.", "",
           "| model | method | trainable | weights | adapters + grads + AdamW | method state "
           "| activations no ckpt | activations ckpt | logits | total no ckpt | total ckpt |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    g = lambda n: f"{n / GiB:.2f}"
    for title, preset in TABLE_MODELS:
        cfg = M.preset_config(preset)
        for method in ALL_METHODS:
            acfg = None if method == "full" else A.AdapterConfig(
                method=method, r=rank, targets=A.LLAMA_LINEAR_NAMES, total_steps=1000)
            e = _estimate(cfg, method, acfg, batch_size, seq_len, torch.bfloat16,
                          torch.bfloat16, True)
            b = e["bytes"]
            state = b["method_state"] + b["step_extra"] + b["calibration"]
            out.append(f"| {title} | {method} | {e['n_trainable'] / 1e6:,.1f}M | "
                       f"{g(b['weights'])} | "
                       f"{g(b['adapters'] + b['adapter_grads'] + b['optimizer'])} | {g(state)} | "
                       f"{g(b['activations_no_ckpt'] + b['weight_copies_no_ckpt'])} | "
                       f"{g(b['activations_ckpt'] + b['weight_copies_ckpt'])} | {g(b['logits'])} | "
                       f"{g(b['total_no_ckpt'])} | {g(b['total_ckpt'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Estimate the memory of a fine-tuning run from the model's shape.")
    ap.add_argument("--model", default="llama-7b",
                    help="preset name or checkpoint folder (only config.json is read)")
    ap.add_argument("--method", default="lora", choices=ALL_METHODS)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(A.LLAMA_LINEAR_NAMES))
    ap.add_argument("--device", default="",
                    help="cpu or cuda: sets the dtypes and checkpointing train.py would use")
    ap.add_argument("--weights-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table of notes/memory.md")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.seq_len, args.batch_size, args.rank))
        return
    from types import SimpleNamespace
    cfg = SimpleNamespace(model=args.model, method=args.method, batch_size=args.batch_size,
                          seq_len=args.seq_len, rank=args.rank, alpha=16.0, dropout=0.0,
                          targets=args.targets, grad_checkpoint=args.grad_checkpoint,
                          device=args.device, grad_accum=1, steps=1000,
                          weights_dtype=args.weights_dtype)
    cfg.adapter_config = lambda: A.AdapterConfig(method=cfg.method, r=cfg.rank, alpha=cfg.alpha,
                                                 targets=cfg.targets, total_steps=cfg.steps)
    print(dry_run_report(cfg))


if __name__ == "__main__":
    M.cli(main)
