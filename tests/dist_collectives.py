"""The collectives check of test_distributed.py, run in 2 spawned processes.

A module of its own so that each spawned process imports only torch and the distributed hooks
(about 2 s on 2 cores), not the test module's imports (the CLI, the API, transformers: about 8 s).
"""

import os

import torch

from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.prune import distributed
from slimgpt_deploy.prune.methods import Decision
from slimgpt_deploy.prune.obs import accumulate_hessian


def collectives(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with distributed.process_group(PruneConfig(device="cpu")):
        assert distributed.active() and distributed.world_size() == world and distributed.rank() == rank
        X = torch.randn(7, 5, 16, generator=torch.Generator().manual_seed(0))  # 7 samples, 5 tokens, 16 inputs
        # every rank's share is contiguous, and together they are all the samples, in order
        mine = distributed.shard(X)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        torch.distributed.all_gather(sizes, torch.tensor([len(mine)]))
        start = sum(int(s) for s in sizes[:rank])
        assert torch.equal(mine, X[start : start + len(mine)]), "shard is not this rank's contiguous part"
        assert sum(int(s) for s in sizes) == len(X)
        # the summed Hessian equals one process's running mean over all samples (batches of 2)
        H, n = torch.zeros(16, 16), 0
        for b in range(0, len(mine), 2):
            H, n = accumulate_hessian(H, n, mine[b : b + 2])
        H, n = distributed.reduce_hessian(H, n)
        H1, n1 = torch.zeros(16, 16), 0
        for b in range(0, len(X), 3):
            H1, n1 = accumulate_hessian(H1, n1, X[b : b + 3])
        assert n == n1 == 35, (n, n1)
        assert torch.allclose(H, H1, rtol=1e-5, atol=1e-6), (H - H1).abs().max()
        assert torch.allclose(H, 2 / 35 * X.reshape(-1, 16).T @ X.reshape(-1, 16), rtol=1e-5, atol=1e-6)
        # a decision made on rank 0 reaches every rank exactly; a rank's own would differ
        g = torch.Generator().manual_seed(100 + rank)
        d = distributed.from_rank0(lambda: Decision([rank, 3], torch.randn(4, 6, generator=g), 0.01 * (rank + 1)))
        assert d.removed == [0, 3] and d.damping == 0.01
        assert torch.equal(d.W, torch.randn(4, 6, generator=torch.Generator().manual_seed(100)))
        ids = distributed.from_rank0(lambda: {"ids": torch.full((2, 3), rank)})
        assert torch.equal(ids["ids"], torch.zeros(2, 3, dtype=torch.int64))
