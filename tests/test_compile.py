"""--compile (Llama.compile_blocks): torch.compile'd blocks give the eager step's loss and
gradients, run only where they should, and refuse what they cannot do. Compiling takes ~10-20 s
here (inductor writes C++ kernels), so the graphs are compiled once and the tests reuse them: every
model below has the same block structure."""
import json
from dataclasses import asdict, replace

import pytest
import torch

import adapters as A
import curvature as C
import model as M
import train as T

from test_train import TRAIN_DATA, lora_grads, lora_model, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100                                  # loss on the last third, as in training
    return ids, labels


def step(net, ids, labels):
    net.zero_grad(set_to_none=True)
    loss = net(ids, labels)
    loss.backward()
    return loss.detach(), lora_grads(net)


class CountingCall:
    """Wraps the compiled block call and counts the calls that reach it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_step_equals_eager_and_runs_only_in_training(tiny_dir, checkpointing):
    from torch._dynamo.utils import counters
    net, _ = lora_model(tiny_dir)                          # random B: every gradient is non-trivial
    net.train()
    net.grad_checkpoint = checkpointing
    ids, labels = batch()
    loss_eager, grads_eager = step(net, ids, labels)

    net.compile_blocks()
    counting = net.compiled_block = CountingCall(net.compiled_block)
    loss_compiled, grads_compiled = step(net, ids, labels)
    # every block went through the compiled call (checkpointing calls it again in backward,
    # to recompute)
    assert counting.calls == len(net.model.layers) * (2 if checkpointing else 1)
    assert counters["stats"]["unique_graphs"] >= 1         # ... and dynamo really produced graphs
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads_eager.keys()
    for name in grads_eager:
        assert grads_eager[name].abs().max() > 0, name
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=1e-4, atol=1e-6,
                                   msg=name)

    # evaluation (no grad, or eval mode) and generation stay eager: no call reaches
    # the compiled graphs
    calls = counting.calls
    with torch.no_grad():
        net(ids, labels)
    net.eval()
    net(ids, labels)
    M.generate(net, ids[0, :4].tolist(), 2)
    net.train()
    assert counting.calls == calls

    # Hessian-vector products need double backward, which compiled graphs lack:
    # twice_differentiable runs eager
    with C.twice_differentiable(net):
        assert net.compiled_block is None
    assert net.compiled_block is counting


def test_train_with_compile_matches_the_eager_run(tiny_dir, tmp_path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        T.train(tiny_cfg(tiny_dir, out, steps=3, compile=compiled))
        runs[compiled] = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    assert len(runs[True]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    assert runs[True][-1] != runs[True][0]                 # the steps did train


def test_a_run_may_resume_with_or_without_compile(tiny_dir, tmp_path):
    saved = tiny_cfg(tiny_dir, tmp_path / "o")
    T.check_resume_config(asdict(saved), replace(saved, compile=True, resume=True))    # no error
    # (the check itself works)
    with pytest.raises(ValueError, match="cannot resume with different settings"):
        T.check_resume_config(asdict(saved), replace(saved, compile=True, lr=1e-3))


@pytest.mark.parametrize("method", ["ctr", "triadapt"])
def test_compile_with_ctr_or_triadapt_is_a_one_line_error(tiny_dir, tmp_path, method):
    with pytest.raises(ValueError, match=f"--compile does not support --method {method} "):
        tiny_cfg(tiny_dir, tmp_path / "o", method=method, compile=True)
