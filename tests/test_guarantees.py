"""Every guarantee of train.py, for every method: one test per guarantee, each parametrized over
lora, adalora, triadapt, ctr, cg and (where it applies) full fine-tuning.

    resume at step 3 of 6           == the uninterrupted run, bit for bit
    SIGTERM at step 2, then resume  == the uninterrupted run, bit for bit
    a NaN loss and an inf activation leave no trace (see test_nonfinite_steps_leave_no_trace)
    gradient accumulation 2 x 2     == batches of 4 (fp32 summation order)
    the peft export                 gives our logits in peft + transformers (full: transformers)
    merged                          == unmerged

2-process DDP == 1 process is in test_distributed.py (torchrun), for the same methods.

The options put each method's decisions inside the 6 steps, on both sides of the step-3
checkpoint and on the dropped steps 2 and 4: AdaLoRA and CTR-LoRA allocate at t = 2 (budget 27
of 36 triplets) and t = 4 (the final one: 24; CTR-LoRA defers one due on a dropped step to the
next good step); TriAdaptLoRA grows at t = 2 and 4; CG-LoRA calibrates its init before step 1;
CTR-LoRA's trust region shrinks steps (at a learning rate where it binds). A tiny transformers
Llama (2 layers, d = 64, HF init: the KL of a step is well above fp32 noise), 4 sequences per
step: well under a second per run. Runs used by several tests are made once per module (`runs`).
"""
import json
import os
import re
import shutil
import signal
import subprocess
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import write_hf_tiny_with_tokenizer

import adapter_io as IO
import adapters as A
import data as D
import model as M
import train as T

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_DATA = M.REPO_DIR / "data" / "wordnet_train.jsonl"
STEPS = 6
OPTIONS = {
    "lora": {},
    "adalora": dict(t_init=1, t_final=2, delta_t=2),
    "triadapt": dict(tri_init_rank=2, tri_warmup=2, tri_interval=2, tri_final=5),
    "ctr": dict(init_rank=6, target_rank=4, t_init=1, t_final=2, delta_t=2, ctr_rho=1e-3,
                ctr_refresh=2),     # statistics on steps 1, 3, 5: the resumed run must know t
    "cg": dict(cg_batches=2),
    "full": {},
}
RUN_OPTIONS = {"ctr": dict(lr=5e-2, warmup_steps=0)}   # steps whose KL exceeds ρ = 1e-3
METHODS = list(OPTIONS)
ADAPTER_METHODS = [m for m in METHODS if m != "full"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return write_hf_tiny_with_tokenizer(tmp_path_factory.mktemp("base"), 3, smollm2_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """64 examples: 6 steps of 4 stay inside one epoch (no leftover differs between batch sizes)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in D.load_jsonl(TRAIN_DATA)[:64]))
    return path


def config(tiny_dir, data_file, method, out, **kw):
    base = dict(model=str(tiny_dir), data=str(data_file), val_data="", out=str(out), steps=STEPS,
                batch_size=4, log_every=1, eval_every=0, save_every=3, keep_checkpoints=5,
                lr=5e-3, rank=4, dropout=0.1, targets="q_proj,v_proj,down_proj", method=method,
                method_options=dict(OPTIONS[method]))
    base.update(RUN_OPTIONS.get(method, {}))
    base.update(kw)
    cfg = T.TrainConfig(**base)
    T.validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_dir, data_file, tmp_path_factory):
    """runs(method, name, **config) -> the run's --out folder, trained once per module."""
    done = {}

    def run(method, name, **kw):
        if (method, name) not in done:
            out = tmp_path_factory.mktemp(f"{method}-{name}")
            T.train(config(tiny_dir, data_file, method, out, **kw))
            done[method, name] = out
        return done[method, name]
    return run


def final_state(out):
    """Everything the run ends with: its last checkpoint's weights and trainer state (optimizer,
    LR groups, RNG, data cursor, method state), without the config (--out, --resume differ)."""
    ckpt = T.latest_checkpoint(out)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state.pop("config")
    weights = {f.name: load_file(str(f)) for f in sorted(ckpt.glob("*.safetensors"))}
    return {"weights": weights, **state}


def assert_identical(a, b, path="state"):
    """Exact equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_close_in_norm(a, b, rel, path="weights"):
    """‖a − b‖ ≤ rel · ‖b‖ per tensor: fp32 sums in another order (CG-LoRA's factors reach |50|,
    so elementwise tolerances would depend on the entry)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_close_in_norm(a[k], b[k], rel, f"{path}.{k}")
    else:
        assert float((a - b).float().norm()) <= rel * float(b.float().norm()) + 1e-12, path


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def resume_from(source_out, step, out):
    """A fresh --out holding only `source_out`'s checkpoint at `step`."""
    name = f"step-{step:06d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_out / "checkpoints" / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name)
    return out


def assert_decisions_happened(method, out, shrunk=True):
    """The runs are only meaningful if the method decided something inside them."""
    rows = [r for r in metrics(out) if "loss" in r]
    if method in ("adalora", "ctr"):        # allocations, logged; the final one reached b_T
        assert any("ranks" in r for r in rows)
        assert rows[-1]["total_rank"] == rows[-1]["budget"] == 4 * 6
    if method == "ctr" and shrunk:
        assert sum(r["clip_rate"] for r in rows) > 0          # the trust region shrank steps
    if method == "triadapt":                # grown at t = 2 and t = 4: 12 + 1 + 6 of 24
        assert (rows[-1]["total_rank"], rows[-1]["budget"]) == (19, 24)
    if method == "cg":
        assert metrics(out)[0]["step"] == 0 and metrics(out)[0]["cg_eta"] > 0


# ----------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("method", METHODS)
def test_resume_at_the_middle_equals_the_uninterrupted_run(runs, tiny_dir, data_file, tmp_path,
                                                           method):
    """6 steps in one go == 3 steps, checkpoint, resume, 3 more: weights, optimizer moments, LR
    groups, RNG (dropout is on), data cursor and the method's state (AdaLoRA's scores, CTR-LoRA's
    curvature and calibration, TriAdaptLoRA's grown structure, CG-LoRA's init — not redone)."""
    a = runs(method, "a")
    assert_decisions_happened(method, a)
    if method == "triadapt":     # grown at t = 2 (the resumed run rebuilds it) and again at t = 4
        state_3 = torch.load(a / "checkpoints" / "step-000003" / "trainer_state.pt",
                             weights_only=True)
        assert [event["step"] for event in state_3["method"]["events"]] == [1]
        assert any(k.endswith("tri_A.2") for k in final_state(a)["weights"]["adapter.safetensors"])
    b = resume_from(a, 3, tmp_path / "b")
    T.train(config(tiny_dir, data_file, method, b, resume=True))
    assert_identical(final_state(a), final_state(b))
    assert [r["step"] for r in metrics(b)] == [4, 5, 6]               # no second calibration row


# --------------------------------------------------------------------------------------- SIGTERM

def sigterm_during_call(n):
    """An accumulate_gradients that has a `kill` process send this process SIGTERM during its
    n-th call (the loop finishes that step, saves a checkpoint and exits 128 + 15)."""
    real, calls = T.accumulate_gradients, []

    def accumulate(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            # without train.py's handler the signal would end pytest: fail here instead
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            subprocess.run(["kill", "-TERM", str(os.getpid())], check=True)
        return real(*args, **kwargs)
    return accumulate


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_saves_a_checkpoint_that_resumes_to_the_same_run(runs, tiny_dir, data_file,
                                                                 tmp_path, method, capsys):
    out = tmp_path / "c"
    with mock.patch.object(T, "accumulate_gradients", sigterm_during_call(2)):
        with pytest.raises(SystemExit) as stop:
            T.train(config(tiny_dir, data_file, method, out))
    assert stop.value.code == 128 + signal.SIGTERM
    assert T.latest_checkpoint(out).name == "step-000002"
    assert "stopped at step 2" in capsys.readouterr().err
    T.train(config(tiny_dir, data_file, method, out, resume=True))
    assert_identical(final_state(runs(method, "a")), final_state(out))


# ---------------------------------------------------------------------------- non-finite steps

DROPPED = {2: "loss", 4: "activation"}      # (1-based) step -> what goes NaN/inf in it


def inject_nonfinite(build=True):
    """Patches for train.py that make step 2's loss NaN (a NaN logit) and put an inf activation in
    step 4 at a position after every label of its row (the input of the last down_proj: the loss
    stays finite, the gradients are NaN through 0 · inf). build=False: the reference — steps 2
    and 4 draw their batch and return a NaN loss without any forward or backward."""
    real_accumulate, real_build, now = T.accumulate_gradients, T.build_model, {}

    def accumulate(net, micro, *args, **kwargs):
        now["step"] = now.get("step", 0) + 1
        if not build and now["step"] in DROPPED:
            return float("nan")
        now["labels"] = micro[-1]["labels"]
        try:
            return real_accumulate(net, micro, *args, **kwargs)
        finally:
            now["labels"] = None               # the checks' own forwards are left alone

    def nan_logit(module, inputs, output):
        if now.get("labels") is not None and DROPPED.get(now["step"]) == "loss":
            output = output.clone()
            output[0, 0] = float("nan")
            return output

    def inf_after_the_labels(module, inputs):
        if now.get("labels") is not None and DROPPED.get(now["step"]) == "activation":
            labels = now["labels"]                                   # (B, T)
            positions = torch.arange(labels.shape[1])
            last = torch.where(labels != -100, positions, -1).max(dim=1).values
            row = int(last.argmin())
            assert last[row] < labels.shape[1] - 1, "no position after the labels to poison"
            x = inputs[0].clone()
            x[row, -1] = float("inf")
            return (x,)

    def build_model(cfg, device):
        net, tok = real_build(cfg, device)
        net.lm_head.register_forward_hook(nan_logit)
        net.model.layers[-1].mlp.down_proj.register_forward_pre_hook(inf_after_the_labels)
        return net, tok

    patches = [mock.patch.object(T, "accumulate_gradients", accumulate)]
    return patches + ([mock.patch.object(T, "build_model", build_model)] if build else [])


def run_patched(patches, cfg):
    for p in patches:
        p.start()
    try:
        T.train(cfg)
    finally:
        for p in patches:
            p.stop()


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_steps_leave_no_trace(runs, tiny_dir, data_file, tmp_path, method, capsys):
    """No trace, precisely: a run whose step 2 has a NaN loss and whose step 4 has an inf
    activation ends in exactly the state (weights, optimizer moments and step counts, method
    statistics, masks, growth, RNG, data cursor) of a run whose steps 2 and 4 drew their batches
    and computed nothing. What a dropped step consumes: its batch and its step number (schedules
    keep their clock: AdaLoRA allocates at t = 2 and 4 and TriAdaptLoRA grows, as in the
    uninterrupted run; CTR-LoRA's allocations due at 2 and 4 wait for the good steps 3 and 5,
    whose trust region bounds them; the final budget is reached). Dropout is on: the RNG is
    rewound too."""
    injected = tmp_path / "injected"
    run_patched(inject_nonfinite(), config(tiny_dir, data_file, method, injected))
    err = capsys.readouterr().err
    assert "step 2: non-finite loss (nan), step skipped" in err
    assert "step 4: non-finite gradient (loss " in err                # the loss itself was finite
    reference = tmp_path / "reference"
    run_patched(inject_nonfinite(build=False), config(tiny_dir, data_file, method, reference))
    assert_identical(final_state(reference), final_state(injected))
    assert final_state(injected)["nonfinite_total"] == 2
    # step numbers as the progress lines count them: steps 2 and 4 log no loss
    assert [r["step"] for r in metrics(injected) if "loss" in r] == [1, 3, 5, 6]
    if method in ("adalora", "ctr"):                    # when the allocations happened
        steps = [2, 4] if method == "adalora" else [3, 5]
        assert re.findall(rf"{method} step (\d+)/6: kept", err) == [str(t) for t in steps]
    assert_decisions_happened(method, injected, shrunk=False)  # (ρ binds on steps 2-4 only)
    # and the dropped steps did change the run (else equality would prove nothing)
    uninterrupted = final_state(runs(method, "a"))["weights"]
    assert any(not torch.equal(uninterrupted[f][k], v)
               for f, w in final_state(injected)["weights"].items() for k, v in w.items())


# ---------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation_equals_the_big_batch(runs, method):
    """6 steps of 2 micro-batches of 2 == 6 steps of batches of 4 (the same examples; no dropout,
    whose masks depend on the batch shapes). CG-LoRA calibrates on the same 8 examples in both
    (4 batches of 2 vs 2 of 4) with the predicted step size: the measured one is taken on the
    first calibration batch, which differs."""
    cg = {"cg_kappa_source": "predicted"} if method == "cg" else {}
    big = runs(method, "big", dropout=0.0,
               method_options={**OPTIONS[method], **cg})
    small = runs(method, "small", dropout=0.0, batch_size=2, grad_accum=2,
                 method_options={**OPTIONS[method], **cg, **({"cg_batches": 4} if cg else {})})
    assert_decisions_happened(method, big)
    # (CTR-LoRA's shrink factors come from measured KLs of ~1e-3 nats, known to ~1e-4: they
    # move its weights by ~3e-5 relative; the other methods agree to ~1e-6)
    assert_close_in_norm(final_state(big)["weights"], final_state(small)["weights"], rel=1e-4)
    rows_big, rows_small = metrics(big), metrics(small)
    assert ([r["loss"] for r in rows_big if "loss" in r]
            == pytest.approx([r["loss"] for r in rows_small if "loss" in r], rel=1e-5))
    assert ([r["grad_norm"] for r in rows_big if "loss" in r]
            == pytest.approx([r["grad_norm"] for r in rows_small if "loss" in r], rel=1e-4))


# ------------------------------------------------------------------------------- export, merge

def tuned(tiny_dir, out):
    net = M.load_pretrained(tiny_dir, torch.float32, "cpu")
    IO.load_adapter(net, str(out))
    return net


IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_gives_our_logits_in_peft_and_transformers(runs, tiny_dir, method):
    """peft's PeftModel on transformers' LlamaForCausalLM loads DIR/peft and gives our logits
    (full fine-tuning: transformers loads the saved model itself)."""
    from transformers import LlamaForCausalLM
    out = runs(method, "a")
    with torch.no_grad():
        base = M.load_pretrained(tiny_dir, torch.float32, "cpu")(IDS)
        if method == "full":                                   # RUN/model/: an HF folder
            ours = M.load_pretrained(out / IO.FULL_MODEL_DIR, torch.float32, "cpu")(IDS)
            theirs = LlamaForCausalLM.from_pretrained(out / IO.FULL_MODEL_DIR,
                                                      dtype=torch.float32).eval()
        else:
            from peft import PeftModel
            ours = tuned(tiny_dir, out)(IDS)
            hf_base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
            theirs = PeftModel.from_pretrained(hf_base, str(out / "peft")).eval()
        assert (ours - base).abs().max() > 1e-4                    # the run changed the model
        assert (theirs(input_ids=IDS).logits - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merged_equals_unmerged(runs, tiny_dir, method):
    """The trained adapter (masked, grown, calibrated) merged into W0 gives the unmerged logits,
    unmerging restores W0, and merged_state_dict is a plain base checkpoint with the same logits
    (full fine-tuning has nothing to merge)."""
    net = tuned(tiny_dir, runs(method, "a")).eval()
    layers = A.adapter_layers(net)
    W0 = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        unmerged = net(IDS)
        A.merge_adapters(net)
        torch.testing.assert_close(net(IDS), unmerged, rtol=0, atol=1e-5)
        A.unmerge_adapters(net)
        for name, layer in layers.items():
            torch.testing.assert_close(layer.weight, W0[name], rtol=0, atol=1e-5)
        plain = M.load_pretrained(tiny_dir, torch.float32, "cpu")
        base = plain(IDS)
        plain.load_state_dict(IO.merged_state_dict(net))
        torch.testing.assert_close(plain(IDS), unmerged, rtol=0, atol=1e-5)
        assert (unmerged - base).abs().max() > 1e-4                # the adapter matters
