"""Tests for TriAdaptLoRA (adapters.py: TriAdaptLinear, growth_count, TriAdaptHooks) — SPEC §4, our
formulation.

Checked against explicit computations: a dense core assembled entry by entry, logits before/after
growth, the budget arithmetic, train.py's uninterrupted run (for resume) and HF peft loading our
export (an independent implementation of the exported LoRA). CPU only, tiny random Llamas.
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import adapter_config as AC
import adapter_io as IO
import adapters as A
from adapters import AdapterConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


from tests.conftest import logits, tiny_llama  # noqa: E402  (fixtures base, idx come from conftest)


def with_triadapt(base, **kw):
    options = {"method": "triadapt", "r": 4, "tri_init_rank": 2, "targets": ALL_LINEARS, **kw}
    cfg = AdapterConfig(**options)
    model = copy.deepcopy(base)
    A.apply_method(model, "triadapt", cfg)
    return model, cfg


@torch.no_grad()
def randomize(model, std=0.1, seed=1):
    """Give every adapter tensor (B, the core strips included) random values, so that growth has
    something to keep."""
    g = torch.Generator().manual_seed(seed)
    for p in A.adapter_named_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# the layer


def test_initialization_is_identity_and_the_first_block_is_A_random_C_identity_B_zero(base, idx):
    model, _ = with_triadapt(base)
    assert torch.equal(logits(model, idx), logits(base, idx))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.rank == 2 and layer.num_blocks == 1 and layer.scale == 16 / 4  # c = α / r_ref
    assert torch.equal(layer.core(), torch.eye(2)) and torch.count_nonzero(layer.full_B()) == 0
    assert 0.01 < layer.full_A().std() < 0.03


def test_core_has_the_block_lower_upper_structure_of_spec(base):
    model, _ = with_triadapt(base, tri_init_rank=3, tri_block=2, targets=["up_proj"])
    layer = model.model.layers[0].mlp.up_proj
    for _ in range(3):
        layer.grow()
    randomize(model)
    offsets = [0, 3, 5, 7, 9]  # block boundaries: r_0 = 3, then k = 2 per growth
    assert layer.rank == 9 and [R.shape for R in layer.tri_R] == [(3, 3), (2, 5), (2, 7), (2, 9)]
    assert [K.shape for K in layer.tri_K] == [(3, 2), (5, 2), (7, 2)]

    dense = torch.zeros(9, 9)  # the core assembled entry by entry from the strips
    for n, R in enumerate(layer.tri_R):  # R_n: new block-row of L, diagonal block included
        dense[offsets[n]:offsets[n + 1], :offsets[n + 1]] = R.detach()
    for n, K in enumerate(layer.tri_K, start=1):  # K_n: new block-column of U above the diagonal
        dense[:offsets[n], offsets[n]:offsets[n + 1]] = K.detach()
    assert torch.equal(layer.core().detach(), dense)

    L, U = layer.lower().detach(), layer.upper().detach()
    assert torch.equal(L + U, dense)
    for n in range(4):
        rows = slice(offsets[n], offsets[n + 1])
        # L: nothing right of the diagonal block
        assert torch.count_nonzero(L[rows, offsets[n + 1]:]) == 0
        # U: nothing on or left of the diagonal block
        assert torch.count_nonzero(U[rows, :offsets[n + 1]]) == 0
    # the strips tile C exactly once: the core has r² free entries, no more
    assert sum(R.numel() for R in layer.tri_R) + sum(K.numel() for K in layer.tri_K) == 81

    x = torch.randn(5, 64)  # forward == c · x (B C A)ᵀ with the dense matrices
    dense_delta = layer.scale * layer.full_B().detach() @ dense @ layer.full_A().detach()
    assert torch.allclose(layer.adapter_forward(x), x @ dense_delta.T, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3])
def test_logits_are_unchanged_by_a_growth_event(base, idx, block):
    """In float64, so that the only difference left is summation order inside the longer matmuls (in
    fp32 that is ~1e-5 here, with large random adapter values; in float64 it is ~1e-14, while the
    adapter's own effect is ~1)."""
    model, cfg = with_triadapt(base, tri_block=block, total_steps=20, tri_warmup=5, tri_interval=5,
                               tri_final=15)
    # B ≠ 0, K and R off-diagonal ≠ 0: growth must preserve a non-trivial function
    randomize(model)
    model.double()
    hooks = A.training_hooks(model, cfg)
    before = logits(model, idx)
    assert (before - logits(base, idx)).abs().max() > 1e-1
    new = hooks.after_optimizer_step(9)  # t = 10: an event at progress 0.5
    assert len(new) > 0 and all(p.dtype == torch.float64 for p in new)
    assert (logits(model, idx) - before).abs().max() <= 1e-12


def test_every_new_tensor_gets_a_gradient_within_two_steps(base, idx):
    model, cfg = with_triadapt(base, total_steps=10, tri_warmup=2, tri_interval=100, tri_final=8,
                               orth_reg=0.0)
    hooks = A.training_hooks(model, cfg)
    optimizer = torch.optim.AdamW(A.optimizer_parameters(model), lr=1e-2)
    model.train()
    first_block = A.optimizer_parameters(model)  # the first blocks a_0, b_0, R_0 of every module
    got_grad, new = {id(p): False for p in first_block}, []
    for step in range(4):
        model(idx, labels=idx).loss.backward()
        for p in first_block + new:
            got_grad[id(p)] |= bool(p.grad is not None and p.grad.abs().max() > 0)
        # two steps after init: every first-block tensor (A_0, R_0 too, though B_0 = 0) has learned
        if step == 1:
            assert all(got_grad[id(p)] for p in first_block)
        optimizer.step()
        grown = hooks.after_optimizer_step(step)  # the event is at t = 2 (step 1)
        optimizer.zero_grad(set_to_none=True)
        if grown:
            optimizer.add_param_group({"params": grown})
            new = grown
            got_grad.update({id(p): False for p in grown})
    assert len(new) == 4  # one module grew (progress 0 -> n = 1): a_n, b_n, R_n, K_n
    assert all(got_grad[id(p)] for p in new)  # in the two steps after growth


# -----------------------------------------------------------------------------
# budget and thresholds


@pytest.mark.parametrize("mode, remaining, progress, modules, block, top_k, expected", [
    ("linear", 28, 0.5, 14, 1, 1, 14),
    ("linear", 28, 0.25, 14, 1, 1, 7),
    ("linear", 28, 0.0, 14, 1, 1, 1),  # clamped up to one module
    ("exponential", 28, 0.5, 14, 1, 1, 5),  # ⌊28^0.5⌋
    ("exponential", 28, 0.0, 14, 1, 1, 1),
    ("exponential", 100, 1.0, 14, 1, 1, 14),  # clamped to the number of modules
    ("fixed", 28, 0.9, 14, 1, 3, 3),
    ("linear", 5, 1.0, 14, 2, 1, 2),  # ⌊R/k⌋ = 2: never overshoot the budget
    ("fixed", 1, 0.5, 14, 2, 3, 0),  # R < k: no growth at all
])
def test_growth_count_follows_the_threshold_rule(mode, remaining, progress, modules, block, top_k,
                                                 expected):
    assert A.growth_count(mode, remaining, progress, modules, block, top_k) == expected


@pytest.mark.parametrize("mode, t, expected", [
    ("linear", 15, 3),  # p = 0.125: ⌊28 · 0.125⌋
    ("linear", 30, 14),  # p = 0.5: ⌊14⌋
    ("exponential", 15, 1),  # ⌊28^0.125⌋ = ⌊1.52⌋
    ("exponential", 30, 5),  # ⌊28^0.5⌋ = ⌊5.29⌋
    ("fixed", 15, 4),
])
def test_each_threshold_mode_grows_the_expected_modules_on_constructed_scores(base, mode, t,
                                                                              expected):
    """14 modules, r_ref 4, initial rank 2: R = 28. Module i's core grows by 0.05·i after the
    reference point, so s_i = ν_i − ν_i^prev increases with i; module 0 has the largest ν but no
    change, and must not be chosen."""
    model, cfg = with_triadapt(base, total_steps=60, tri_warmup=10, tri_interval=5, tri_final=50,
                               tri_threshold=mode, tri_top_k=4)
    layers = list(A.adapter_layers(model).values())
    with torch.no_grad():
        layers[0].tri_R[0].mul_(5.0)  # large ν, but recorded as ν^prev below
    hooks = A.training_hooks(model, cfg)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.tri_R[0].mul_(1 + 0.05 * i)
    hooks.after_optimizer_step(t - 1)
    ranks = [layer.rank for layer in layers]
    grown = [i for i, r in enumerate(ranks) if r == 3]
    assert len(grown) == expected
    assert grown == list(range(14 - expected, 14))  # the modules with the highest s_ℓ
    assert sum(ranks) == 28 + expected
    # ν^prev is recorded after growth: with no further change, scores are 0 for modules
    # that did not grow
    nu = {n: A.normalized_frobenius_norm(m) for n, m in hooks.layers.items()}
    assert nu == hooks.nu_prev


@pytest.mark.parametrize("mode", AC.THRESHOLD_MODES)
@pytest.mark.parametrize("init_rank, block", [(2, 1), (2, 3), (1, 2)])
def test_total_rank_never_exceeds_the_budget(base, mode, init_rank, block):
    model, cfg = with_triadapt(base, tri_init_rank=init_rank, tri_block=block, total_steps=40,
                               tri_warmup=1, tri_interval=1, tri_final=30, tri_threshold=mode,
                               tri_top_k=5)
    hooks = A.training_hooks(model, cfg)
    g = torch.Generator().manual_seed(0)
    budget = 4 * 14
    for step in range(40):
        with torch.no_grad():  # perturb the cores so that scores differ from event to event
            for layer in hooks.layers.values():
                layer.tri_R[0].add_(0.1 * torch.randn(layer.tri_R[0].shape, generator=g))
        hooks.after_optimizer_step(step)
        assert hooks.total_rank() <= budget
        assert (hooks.log_items()["total_rank"] == hooks.total_rank()
                == sum(A.adapter_ranks(model).values()))
    # and it is used up (all modes get there in 30 events here)
    assert budget - hooks.total_rank() < block


# -----------------------------------------------------------------------------
# export, save/load, resume


def grown_model(base, idx):
    """Every module grown 0, 1 or 2 times (ranks 2, 3, 4) with random values: rank_pattern is
    needed."""
    model, cfg = with_triadapt(base, total_steps=30)
    for i, layer in enumerate(A.adapter_layers(model).values()):
        for _ in range(i % 3):
            layer.grow()
    randomize(model)
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-2
    return model, cfg


def test_exported_triadapt_loads_in_peft_and_gives_our_logits(base, idx, tmp_path):
    model, cfg = grown_model(base, idx)
    IO.export_peft(model, cfg, str(tmp_path), base_model_name_or_path="tiny-random-llama")
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = A.adapter_ranks(model)
    assert {**{n: peft_cfg["r"] for n in ranks}, **peft_cfg["rank_pattern"]} == ranks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    for name, layer in A.adapter_layers(model).items():
        assert (loaded.base_model.model.get_submodule(name).scaling["default"]
                == pytest.approx(16 / 4))  # α / r_ref
    assert (logits(loaded, idx) - logits(model, idx)).abs().max() <= 1e-5


def test_save_then_load_rebuilds_the_grown_blocks(base, idx, tmp_path):
    model, cfg = grown_model(base, idx)
    IO.save_adapter(model, cfg, str(tmp_path))
    fresh = copy.deepcopy(base)
    assert IO.load_adapter(fresh, str(tmp_path)) == cfg
    blocks = {n: m.num_blocks for n, m in A.adapter_layers(model).items()}
    assert {n: m.num_blocks for n, m in A.adapter_layers(fresh).items()} == blocks
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    # load_adapter_weights into freshly built (un-grown) adapters grows them from
    # adapter.json first
    ungrown, _ = with_triadapt(base, total_steps=30)
    IO.load_adapter_weights(ungrown, str(tmp_path))
    assert {n: m.num_blocks for n, m in A.adapter_layers(ungrown).items()} == blocks
    assert torch.equal(logits(ungrown, idx), logits(model, idx))


def test_adapter_files_hold_one_tensor_per_block_and_a_missing_block_is_a_one_line_error(base, idx,
                                                                                          tmp_path):
    """tri_A.n = a_n (k×d_in), tri_B.n = b_n (d_out×k), tri_R.n = R_n, tri_K.n = K_{n+1}: the
    layer's own parameters. A file that lost a block does not load, and the message names it."""
    from safetensors.torch import save_file
    model, cfg = grown_model(base, idx)
    IO.save_adapter(model, cfg, str(tmp_path))
    saved = load_file(str(tmp_path / IO.ADAPTER_WEIGHTS_NAME))
    for name, layer in A.adapter_layers(model).items():
        for kind, blocks in (("A", layer.tri_A), ("B", layer.tri_B), ("R", layer.tri_R),
                             ("K", layer.tri_K)):
            for n, t in enumerate(blocks):
                assert torch.equal(saved[f"{name}.tri_{kind}.{n}"], t.detach())
    fresh = copy.deepcopy(base)
    IO.load_adapter(fresh, str(tmp_path))
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    lost = next(k for k in saved if ".tri_K." in k)
    del saved[lost]
    save_file(saved, str(tmp_path / IO.ADAPTER_WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"missing {lost}") as e:
        IO.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert "\n" not in str(e.value)


def test_training_the_blocks_equals_an_explicit_reimplementation():
    """An explicit reimplementation keeps a_n, b_n, R_n, K_n as separate leaves, builds ΔW by
    concatenation and a core filled in entry by entry, with AdamW groups born at growth (their own
    state and learning rate); our layer trained by a plain loop (backward, step) must match it."""
    torch.manual_seed(0)
    layer = A.TriAdaptLinear(torch.nn.Linear(6, 5, bias=False), r_ref=4, alpha=8.0, init_rank=2,
                             block=1)
    layer.double()
    x, target = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    ref = [[t.detach().clone().requires_grad_(True)
            for t in (layer.tri_A[0], layer.tri_B[0], layer.tri_R[0])]]
    opt = torch.optim.AdamW(A.optimizer_parameters(layer), lr=0.05, fused=True)
    ref_opt = torch.optim.AdamW(ref[0], lr=0.05)

    def ref_delta():  # c · B C A with C = L + U filled in from the strips, one block at a time
        a = torch.cat([blk[0] for blk in ref])
        b = torch.cat([blk[1] for blk in ref], dim=1)
        r, rows = a.shape[0], [0]
        for blk in ref:
            rows.append(rows[-1] + blk[0].shape[0])
        C = torch.zeros(r, r, dtype=a.dtype)
        for n, blk in enumerate(ref):
            C = C.index_put((torch.arange(rows[n], rows[n + 1])[:, None],
                             torch.arange(rows[n + 1])), blk[2])
            if n:
                C = C.index_put((torch.arange(rows[n])[:, None],
                                 torch.arange(rows[n], rows[n + 1])), blk[3])
        return layer.scale * b @ C @ a

    for step in range(8):
        ((layer(x) - target) ** 2).sum().backward()
        ((x @ (layer.weight + ref_delta()).t() - target) ** 2).sum().backward()
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
        # growth: new blocks / new leaves, each set in a group with a smaller learning rate
        if step in (2, 4):
            new = layer.grow()
            opt.add_param_group({"params": new, "lr": 0.02 * step})
            blk = [t.detach().clone().requires_grad_(True) for t in new]
            ref.append(blk)
            ref_opt.add_param_group({"params": blk, "lr": 0.02 * step})
        for n, blk in enumerate(ref):
            mine = ((layer.tri_A[n], layer.tri_B[n], layer.tri_R[n])
                    + ((layer.tri_K[n - 1],) if n else ()))
            for m, r in zip(mine, blk):
                torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-10, atol=1e-12)
    # the grown blocks did train
    assert layer.num_blocks == 3 and float(ref[1][1].detach().abs().sum()) > 0
    with torch.no_grad():
        mine = layer.scale * layer.full_B() @ layer.core() @ layer.full_A()
        torch.testing.assert_close(mine, ref_delta(), rtol=1e-10, atol=1e-12)


def test_a_plain_loop_trains_every_adapter_tensor_before_and_after_growth(base, idx):
    """The loop a fork writes: AdamW(optimizer_parameters(net)), then backward and step, nothing
    else. Before growth and after it (the grown blocks added as a group, as after_optimizer_step
    returns them), every adapter tensor changes within three steps."""
    model, cfg = with_triadapt(base, total_steps=30, orth_reg=0.0)
    model.train()

    def changed_after_three_steps(opt):
        before = {n: p.detach().clone() for n, p in A.adapter_named_parameters(model).items()}
        for _ in range(3):
            model(idx, labels=idx).loss.backward()
            opt.step()
            opt.zero_grad()
        after = A.adapter_named_parameters(model)
        return {n: not torch.equal(after[n].detach(), before[n]) for n in before}

    opt = torch.optim.AdamW(A.optimizer_parameters(model), lr=1e-2)
    first = changed_after_three_steps(opt)
    assert len(first) == 14 * 3 and all(first.values()), [n for n, c in first.items() if not c]
    grown = [p for layer in A.adapter_layers(model).values() for p in layer.grow()]
    opt.add_param_group({"params": grown})
    second = changed_after_three_steps(opt)
    assert len(second) == 14 * 7 and all(second.values()), [n for n, c in second.items() if not c]


def test_a_grown_block_left_out_of_the_optimizer_is_a_loud_error(base):
    model, cfg = with_triadapt(base, total_steps=30, tri_warmup=3, tri_interval=3, tri_final=20)
    hooks = A.training_hooks(model, cfg)
    opt = torch.optim.AdamW(A.optimizer_parameters(model), lr=1e-2)
    assert hooks.after_optimizer_step(2)  # t = 3: an event; its blocks are returned ...
    with pytest.raises(RuntimeError, match="add_param_group"):  # ... and never added
        hooks.before_optimizer_step(opt, 3)


def test_restore_replays_growth_in_order_and_refuses_a_changed_schedule(base, idx):
    model, cfg = with_triadapt(base, total_steps=30, tri_warmup=3, tri_interval=3, tri_final=20)
    hooks = A.training_hooks(model, cfg)
    # events at t = 3 and t = 6
    joined = [(hooks.after_optimizer_step(step), step + 1) for step in (2, 5)]
    state = hooks.state_dict()
    fresh, _ = with_triadapt(base, total_steps=30, tri_warmup=3, tri_interval=3, tri_final=20)
    groups = A.training_hooks(fresh, cfg).restore_structure(state)
    assert [(len(p), s) for p, s in groups] == [(len(p), s) for p, s in joined]
    assert ([[tuple(t.shape) for t in p] for p, _ in groups]
            == [[tuple(t.shape) for t in p] for p, _ in joined])
    assert {n: m.rank for n, m in A.adapter_layers(fresh).items()} == A.adapter_ranks(model)
    other, other_cfg = with_triadapt(base, total_steps=40, tri_warmup=3, tri_interval=3,
                                     tri_final=20)
    with pytest.raises(ValueError, match="resume with --steps 30"):
        A.training_hooks(other, other_cfg).restore_structure(state)
    # a checkpoint of the window storage: its optimizer state does not fit
    state["storage"] = "whole factors"
    with pytest.raises(ValueError, match="windows of whole factors"):
        A.training_hooks(with_triadapt(base, total_steps=30)[0], cfg).restore_structure(state)


@pytest.mark.parametrize("options, named", [
    (dict(tri_init_rank=6), "--tri-init-rank 6 must be in [1, --rank 4]"),
    (dict(tri_threshold="quadratic"), "--tri-threshold"),
    (dict(tri_warmup=50, tri_final=40), "--tri-final 40 must come after --tri-warmup 50"),
    (dict(tri_final=120), "--tri-final 120 is after the last step (--steps 100)"),
    (dict(tri_block=0), "--tri-block"),
    (dict(tri_interval=0), "--tri-interval"),
])
def test_bad_triadapt_options_are_one_line_errors_naming_the_flag(options, named):
    with pytest.raises(ValueError) as e:
        AdapterConfig(method="triadapt", r=4, total_steps=100, **options)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_defaults_fit_the_100_step_demo():
    cfg = AdapterConfig(method="triadapt", r=8, targets=ALL_LINEARS, total_steps=100)
    assert AC.triadapt_events(cfg) == (10, 10, 70) and AC.triadapt_init_rank(cfg) == 4


# train.py runs (growth across a resume, growth on a dropped step, accumulation, DDP, peft
# export, merge) are in test_guarantees.py and test_distributed.py, for every method
