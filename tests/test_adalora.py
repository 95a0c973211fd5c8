"""Tests for AdaLoRA (adapters.py: SVDLinear, BudgetSchedule, SensitivityScores, MaskAllocator,
AdaLoRAHooks).

The oracle is HF peft's AdaLoRA: its RankAllocator.budget_schedule for the schedule, its
update_ipt + mask_to_budget for which triplets are kept, its forward for the orthogonality penalty.
Everything runs on CPU with a tiny random transformers LlamaForCausalLM (hidden 64, 2 layers) or a
tiny Llama checkpoint trained through train.py.
"""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

import adapter_config as AC
import adapter_io as IO
import adapters as A
import model as M
from adapters import AdapterConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


from tests.conftest import logits, tiny_llama  # noqa: E402  (fixtures base, idx come from conftest)


def with_adalora(base, **kw):
    cfg = AdapterConfig(**{"method": "adalora", "r": 4, "targets": ALL_LINEARS, **kw})
    model = copy.deepcopy(base)
    A.apply_method(model, "adalora", cfg)
    return model, cfg


def peft_adalora(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base),
                                   peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))


@torch.no_grad()
def randomize_lambda(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    for layer in A.adapter_layers(model).values():
        layer.lora_lambda.copy_(torch.randn(layer.lora_lambda.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# the layer


def test_adalora_at_init_leaves_logits_unchanged(base, idx):
    model, _ = with_adalora(base)
    assert torch.equal(logits(model, idx), logits(base, idx))  # λ = 0 -> ΔW = 0 exactly
    layer = model.model.layers[0].mlp.up_proj
    assert layer.lora_P.shape == (128, 6) and layer.lora_Q.shape == (6, 64)  # r₀ = ⌈1.5 · 4⌉
    assert (torch.count_nonzero(layer.lora_lambda) == 0
            and torch.equal(layer.lora_mask, torch.ones(6)))
    assert 0.015 < layer.lora_Q.std() < 0.025 and 0.015 < layer.lora_P.std() < 0.025  # N(0, 0.02²)
    assert layer.scale == 16 / 6  # c = α / r₀
    randomize_lambda(model)
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-3


def test_masked_lambda_still_gets_a_gradient(base, idx):
    """No multiplicative mask in the forward: CTR-LoRA needs ∂L/∂λ_i of masked triplets."""
    model, _ = with_adalora(base)
    randomize_lambda(model)
    layer = model.model.layers[1].self_attn.v_proj
    layer.lora_mask[[1, 4]] = 0
    layer.apply_mask()
    assert (torch.all(layer.lora_lambda[[1, 4]] == 0)
            and torch.all(layer.lora_lambda[[0, 2, 3, 5]] != 0))
    model(idx, labels=idx).loss.backward()
    assert torch.all(layer.lora_lambda.grad[[1, 4]] != 0)


def test_lora_factors_are_the_exact_form_of_the_kept_triplets(base):
    model, _ = with_adalora(base)
    randomize_lambda(model)
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_mask[[0, 3]] = 0
    layer.apply_mask()
    A_, B_, scale = layer.lora_factors()
    assert (A_.shape == (4, 64) and B_.shape == (64, 4) and layer.active_rank == 4
            and layer.rank == 6)
    # c · P diag(λ) Q
    dense = layer.scale * layer.lora_P @ torch.diag(layer.lora_lambda) @ layer.lora_Q
    assert torch.allclose(scale * B_ @ A_, dense, atol=1e-7)


# -----------------------------------------------------------------------------
# the schedule, against peft


@pytest.mark.parametrize("init_r, target_r, tinit, tfinal, delta_t, total", [
    (12, 8, 10, 30, 10, 100),  # the demo's defaults: 10% / 30% of 100 steps, ΔT = 10
    (6, 2, 0, 0, 1, 20),
    (8, 4, 3, 5, 2, 17),
    (5, 5, 2, 3, 1, 12),  # target = initial: a constant budget
    (9, 1, 7, 1, 3, 40),
])
def test_budget_schedule_equals_peft_budget_schedule(base, init_r, target_r, tinit, tfinal,
                                                     delta_t, total):
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft_adalora(base, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                          deltaT=delta_t, total_step=total,
                          target_modules=targets).base_model.rankallocator
    cfg = AdapterConfig(method="adalora", r=target_r, init_rank=init_r, target_rank=target_r,
                        t_init=tinit, t_final=tfinal, delta_t=delta_t, total_steps=total,
                        targets=targets)
    ours = A.BudgetSchedule.for_svd_layers(cfg, n_modules=2 * len(targets))
    assert (ours.initial, ours.target) == (theirs.init_bgt, theirs.target_bgt)
    for t in range(0, total + 2):
        assert ours(t) == theirs.budget_schedule(t), t


def test_linear_schedule_falls_linearly_between_the_same_end_points():
    cubic = A.BudgetSchedule(120, 40, 100, 10, 20, 1, "cubic")
    linear = A.BudgetSchedule(120, 40, 100, 10, 20, 1, "linear")
    for t in (0, 10, 80, 81, 100):
        assert linear(t) == cubic(t)
    assert linear(45)[0] == 120 - (120 - 40) * 35 // 70 and cubic(45)[0] < linear(45)[0]


def test_defaults_fit_the_100_step_demo():
    cfg = AdapterConfig(method="adalora", r=8, targets=ALL_LINEARS, total_steps=100)
    schedule = A.BudgetSchedule.for_svd_layers(cfg, n_modules=210)
    assert AC.svd_ranks(cfg) == (12, 8)  # peft's init_r / target_r
    assert (schedule.t_init, schedule.t_final, schedule.delta_t) == (10, 30, 10)
    assert (schedule.initial, schedule.target) == (12 * 210, 8 * 210)


# -----------------------------------------------------------------------------
# masking


def test_mask_selection_matches_peft_mask_to_budget(base):
    """Same weights and gradients -> peft's update_ipt + mask_to_budget keep the same triplets as
    ours."""
    targets = ["q_proj", "v_proj", "gate_proj"]
    ours, cfg = with_adalora(base, targets=targets, total_steps=50)
    theirs = peft_adalora(base, init_r=6, target_r=4, tinit=2, tfinal=5, deltaT=1, total_step=50,
                          target_modules=targets).base_model
    inner = theirs.model
    layers = A.adapter_layers(ours)
    randomize_lambda(ours)
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = inner.get_submodule(name)
            peft_layer.lora_A["default"].copy_(layer.lora_Q)
            peft_layer.lora_E["default"].copy_(layer.lora_lambda[:, None])
            peft_layer.lora_B["default"].copy_(layer.lora_P)
    scores = A.SensitivityScores(layers, cfg.beta1, cfg.beta2)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # three EMA updates with the same random gradients in both
        for name, layer in layers.items():
            peft_layer = inner.get_submodule(name)
            for ours_p, theirs_p in ((layer.lora_Q, peft_layer.lora_A["default"]),
                                     (layer.lora_lambda, peft_layer.lora_E["default"]),
                                     (layer.lora_P, peft_layer.lora_B["default"])):
                grad = torch.randn(theirs_p.shape, generator=g)
                theirs_p.grad, ours_p.grad = grad.clone(), grad.reshape(ours_p.shape).clone()
        theirs.rankallocator.update_ipt(inner)
        scores.update()
    budget = 21  # of 36 triplets
    pattern = theirs.rankallocator.mask_to_budget(inner, budget)
    masks = A.keep_top_budget(scores.triplet_scores(), budget)
    assert sum(int(m.sum()) for m in masks.values()) == budget
    for name in layers:
        assert masks[name].bool().tolist() == pattern[f"{name}.lora_E.default"], name
    # ranks differ across modules: the test means something
    assert len({int(m.sum()) for m in masks.values()}) > 1


def train_steps(model, cfg, hooks, steps, idx, check):
    """A train.py-like loop on the tiny model: backward (+ penalty), AdamW step, hooks, then
    `check(t)`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model(idx, labels=idx).loss
        reg = hooks.regularizer()
        (loss + reg).backward()
        optimizer.step()
        hooks.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
        check(step + 1)


def test_every_allocation_keeps_exactly_the_budget_and_masked_lambda_are_zero(base, idx, capsys):
    model, cfg = with_adalora(base, total_steps=16, t_init=2, t_final=4, delta_t=2)
    hooks = A.training_hooks(model, cfg)
    layers = A.adapter_layers(model)
    allocations, frozen_masks = [], {}

    def check(t):
        budget, _ = hooks.schedule(t)
        kept = sum(layer.active_rank for layer in layers.values())
        # allocation steps; 12 = T − t_f forces b_T
        if (t > 2 and t % 2 == 0 and t < 12) or t == 12:
            allocations.append(t)
            assert kept == budget, (t, kept, budget)
        for layer in layers.values():
            assert torch.all(layer.lora_lambda[layer.lora_mask == 0] == 0)
        if t == 12:
            frozen_masks.update({n: layer.lora_mask.clone() for n, layer in layers.items()})
        if t > 12:
            assert all(torch.equal(layer.lora_mask, frozen_masks[n]) for n, layer in layers.items())
        items = hooks.log_items()
        assert items["total_rank"] == kept and items["budget"] == budget
        assert ("ranks" in items) == (t in allocations)

    train_steps(model, cfg, hooks, 16, idx, check)
    assert allocations == [4, 6, 8, 10, 12]
    assert sum(layer.active_rank for layer in layers.values()) == 4 * 14  # target rank × modules
    assert len({layer.active_rank for layer in layers.values()}) > 1  # allocation is not uniform
    assert capsys.readouterr().err.count("adalora step") == 5  # one line per allocation event


def test_orthogonality_penalty_equals_peft(base, idx):
    targets = ["q_proj", "up_proj", "down_proj"]
    ours, cfg = with_adalora(base, targets=targets, total_steps=50, orth_reg=0.3)
    theirs = peft_adalora(base, init_r=6, target_r=4, tinit=2, tfinal=5, total_step=50,
                          target_modules=targets, orth_reg_weight=0.3)
    with torch.no_grad():
        for name, layer in A.adapter_layers(ours).items():
            layer.lora_P.normal_(0, 0.3)  # far from orthonormal, so the penalty is large
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].copy_(layer.lora_Q)
            peft_layer.lora_B["default"].copy_(layer.lora_P)
        with_penalty = theirs(input_ids=idx, labels=idx).loss
        theirs.peft_config["default"].orth_reg_weight = 0.0
        without = theirs(input_ids=idx, labels=idx).loss
    ours_penalty = A.training_hooks(ours, cfg).regularizer()
    assert ours_penalty > 0.1
    assert torch.allclose(ours_penalty, with_penalty - without, atol=1e-5)


# -----------------------------------------------------------------------------
# save / load / export


def test_masked_adalora_saves_loads_and_exports_to_peft_with_our_logits(base, idx, tmp_path):
    model, cfg = with_adalora(base, total_steps=50)
    randomize_lambda(model)
    with torch.no_grad():
        for i, layer in enumerate(A.adapter_layers(model).values()):
            layer.lora_mask[: i % 5] = 0  # 6, 5, 4, 3, 2 kept triplets
            layer.apply_mask()
    ranks = A.adapter_ranks(model)
    assert len(set(ranks.values())) == 5

    IO.save_adapter(model, cfg, str(tmp_path / "ours"))
    meta = json.loads((tmp_path / "ours" / "adapter.json").read_text())
    # in use vs shape rank r₀
    assert meta["active_ranks"] == ranks and set(meta["ranks"].values()) == {6}
    fresh = copy.deepcopy(base)
    assert IO.load_adapter(fresh, str(tmp_path / "ours")) == cfg
    assert A.adapter_ranks(fresh) == ranks and torch.equal(logits(fresh, idx), logits(model, idx))

    IO.export_peft(model, cfg, str(tmp_path / "peft"))
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # allocated ranks
    assert {**{n: peft_cfg["r"] for n in ranks}, **peft_cfg["rank_pattern"]} == ranks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-3
    assert (logits(loaded, idx) - logits(model, idx)).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# misuse: one-line errors at construction that name the flag


@pytest.mark.parametrize("options, named", [
    (dict(t_init=60, t_final=40), "--t-init 60 + --t-final 40 must be less than --steps 100"),
    (dict(init_rank=12, target_rank=16), "--target-rank 16 is larger than --init-rank 12"),
    (dict(delta_t=0), "--delta-t"),
    (dict(budget_schedule="quadratic"), "--budget-schedule"),
    (dict(beta1=1.0), "--beta1"),
    (dict(t_final=-3), "--t-final"),
    (dict(orth_reg=-1.0), "--orth-reg"),
])
def test_impossible_schedule_or_budget_is_a_one_line_error_naming_the_flag(options, named):
    with pytest.raises(ValueError) as e:
        AdapterConfig(method="adalora", r=8, total_steps=100, **options)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_hooks_without_total_steps_say_how_to_fix_it(base):
    # total_steps = 0: fine for building / loading, not for training
    model, cfg = with_adalora(base)
    with pytest.raises(ValueError, match="set total_steps"):
        A.training_hooks(model, cfg)


def test_train_cli_rejects_an_impossible_schedule_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(M.REPO_DIR / "train.py"), "--method", "adalora",
                        "--steps", "10", "--t-init", "8", "--t-final", "5",
                        "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "--t-init 8 + --t-final 5 must be less than --steps 10" in lines[0]


# train.py runs (the budget reached, resume, a non-finite step at an allocation, accumulation,
# DDP, peft export, merge) are in test_guarantees.py and test_distributed.py, for every method
