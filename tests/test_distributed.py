"""train.py under torchrun (DDP, gloo on CPU): 2 processes == 1 process with the same global batch.

Each test launches `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py ...`
(the real launcher, real gloo process group) and compares every rank's final adapter tensors with
each other (exactly) and with a single-process run of batch 2 × per-rank batch (within fp32
summation-order tolerance).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import adapter_io as IO
import adapters as A
import model as M
import train as T

REPO = M.REPO_DIR
TRAIN_DATA = str(REPO / "data" / "wordnet_train.jsonl")
# fp32: the two halves of a batch are summed in another order than the whole
TOL = dict(rtol=1e-4, atol=1e-5)

# method flags chosen so that rank decisions happen within 8 steps: TriAdaptLoRA grows at
# t = 2, 4, 6; AdaLoRA (r₀ = 6) and CTR-LoRA start at r₀ = 6, reallocate at t = 4 and 6 (budget
# falls to 4 per module) and CTR-LoRA's trust region binds; CG-LoRA calibrates its init
METHODS = {
    "lora": [],
    "adalora": ["--t-init", "2", "--t-final", "2", "--delta-t", "2"],
    "triadapt": ["--tri-init-rank", "2", "--tri-warmup", "2", "--tri-interval", "2",
                 "--tri-final", "6"],
    "ctr": ["--t-init", "2", "--t-final", "2", "--delta-t", "2", "--ctr-rho", "1e-9"],
    "cg": ["--cg-kappa-source", "predicted"],
    "full": [],
}
# CG-LoRA calibrates on --cg-batches batches of --batch-size, the same on every rank: both runs
# calibrate on the same 16 examples (4 x 4 per rank, 2 x 8 in one process). The predicted step
# size: the measured one is taken on the first calibration batch, which differs.
CALIBRATION = {"cg": (["--cg-batches", "4"], ["--cg-batches", "2"])}


def flags(tiny_dir, out, method, batch_size, steps=8, extra=()):
    return ["--model", str(tiny_dir), "--data", TRAIN_DATA, "--val-data", "", "--out", str(out),
            "--method", method, "--steps", str(steps), "--batch-size", str(batch_size),
            "--lr", "5e-3", "--rank", "4", "--targets", "q_proj,v_proj,down_proj",
            "--log-every", "1", "--eval-every", "0", "--save-every", "0",
            "--grad-checkpoint", "--device", "cpu", *METHODS[method], *extra]


def torchrun(args, tmp_path, nproc=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pattern = str(tmp_path / "rank{rank}.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}",
                        str(REPO / "tests" / "ddp_worker.py"), pattern, *args],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(pattern.format(rank=k), weights_only=True) for k in range(nproc)], r.stderr


def single_process_state(argv):
    net = T.train(T.parse_args(argv))["model"]
    full = not A.adapter_layers(net)                       # --method full: every weight
    return ({k: v.detach().clone() for k, v in net.state_dict().items()
             if full or ".lora_" in k or ".tri_" in k}, A.adapter_ranks(net))


@pytest.mark.parametrize("method", list(METHODS))
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tiny_dir, tmp_path, method):
    ddp_extra, one_extra = CALIBRATION.get(method, ((), ()))
    (r0, r1), log = torchrun(flags(tiny_dir, tmp_path / "ddp", method, batch_size=4,
                                   extra=ddp_extra), tmp_path)
    # identical on both ranks: weights, TriAdaptLoRA's grown structure, CTR-LoRA's masks
    assert r0["ranks"] == r1["ranks"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # equal to one process with batch 8 = 2 ranks x 4
    state, ranks = single_process_state(flags(tiny_dir, tmp_path / "one", method, batch_size=8,
                                              extra=one_extra))
    assert ranks == r0["ranks"]
    assert state.keys() == r0["state"].keys()
    for k in state:
        torch.testing.assert_close(r0["state"][k], state[k], **TOL, msg=k)
    if method == "triadapt":                 # the test is only meaningful if modules grew
        assert sum(r0["ranks"].values()) > 2 * len(r0["ranks"])
    if method in ("adalora", "ctr"):         # ... and if masks were chosen
        masks = [v for k, v in r0["state"].items() if k.endswith("lora_mask")]
        assert masks and any(m.sum() < m.numel() for m in masks)
    if method == "ctr":
        clipped = [json.loads(line).get("clip_rate", 0)
                   for line in open(tmp_path / "ddp" / "metrics.jsonl")]
        assert max(clipped) > 0              # steps were shrunk, by a κ from all-reduced curvature
    # rank 0 alone wrote the run folder; its adapter is rank 0's weights; the logged loss is the
    # global one
    weights = (f"{IO.FULL_MODEL_DIR}/model.safetensors" if method == "full"
               else IO.ADAPTER_WEIGHTS_NAME)
    saved = load_file(str(tmp_path / "ddp" / weights))
    assert saved.keys() and all(torch.equal(saved[k], r0["state"][k])
                                for k in saved if k in r0["state"])
    ddp_rows = [json.loads(l) for l in open(tmp_path / "ddp" / "metrics.jsonl") if '"loss"' in l]
    one_rows = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl") if '"loss"' in l]
    assert [r["step"] for r in ddp_rows] == list(range(1, 9))
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-4)
    # the gradient itself (AdamW and clipping would hide a wrong gradient scale; the logged
    # pre-clip norm does not)
    assert ([r["grad_norm"] for r in ddp_rows]
            == pytest.approx([r["grad_norm"] for r in one_rows], rel=1e-4))


def test_two_rank_run_resumes_exactly_with_the_same_world_size(tiny_dir, tmp_path):
    """8 steps in one go == 4 steps, checkpoint, resume, 4 more — with 2 ranks, dropout on
    (per-rank RNG state)."""
    extra = ["--dropout", "0.1", "--save-every", "4", "--keep-checkpoints", "5"]
    (a0, _), _ = torchrun(flags(tiny_dir, tmp_path / "a", "triadapt", 4, extra=extra),
                          tmp_path / "a_")
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000004",
                    b / "checkpoints" / "step-000004")
    (b / "checkpoints" / "latest").write_text("step-000004")
    (b0, b1), log = torchrun(flags(tiny_dir, b, "triadapt", 4, extra=extra + ["--resume"]),
                             tmp_path / "b_")
    assert "resumed from" in log
    for k in a0["state"]:
        assert (torch.equal(a0["state"][k], b0["state"][k])
                and torch.equal(b0["state"][k], b1["state"][k])), k
    # a different world size cannot resume this run's data cursor
    with pytest.raises(Exception, match="world_size=2"):
        T.train(T.parse_args(flags(tiny_dir, b, "triadapt", 4, extra=extra + ["--resume"])))
