"""One torchrun process of tests/test_distributed.py: run train.py's train() and save what this
rank ends with.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_PATTERN [train.py flags...]

OUT_PATTERN holds "{rank}"; each rank writes its adapter tensors (parameters and mask buffers;
every weight for --method full) and ranks there, so the test sees every rank's weights directly,
not only rank 0's saved adapter.
"""
import os
import sys

import torch

import adapters as A
import train as T


def main():
    pattern, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    net = T.train(T.parse_args(argv))["model"]
    full = not A.adapter_layers(net)                       # --method full: every weight
    state = {k: v.detach().clone() for k, v in net.state_dict().items()
             if full or ".lora_" in k or ".tri_" in k}
    torch.save({"state": state, "ranks": A.adapter_ranks(net)}, pattern.format(rank=rank))


if __name__ == "__main__":
    main()
