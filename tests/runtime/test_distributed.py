"""Bypass under DistributedDataParallel: 2 CPU processes (gloo), each on its own data shard.

Every rank must choose the same sites (auto selection all-reduces the escape scores), extend with
the same initial values, roll back together when one rank's loss is NaN, contract identically and
end with identical weights.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 40


def _worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    import morphc

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)                       # same initial model on every rank
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                              nn.Linear(16, 1))
        gen = torch.Generator().manual_seed(100 + rank)   # a different data shard per rank
        x, y = torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen)
        bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
                           trigger=morphc.Schedule(every=6), bypass_steps=6, return_steps=6,
                           sites="auto", top_k=2, width=4, ddp=True, verbose=False)
        poisoned = []

        def closure(module):
            loss = F.mse_loss(module(x), y)
            # one rank only goes NaN, once, during the third cycle's bypass phase
            if rank == 1 and not poisoned and bp.cycle == 2 and bp.phase == "bypass" and \
                    bp.phase_step == 2:
                poisoned.append(bp.step_count)
                return loss * float("nan")
            return loss

        wrapped = []
        for _ in range(STEPS):
            bp.step(closure)
            wrapped.append(type(bp.model).__name__)
        final = bp.finish()
        flat = torch.cat([p.detach().reshape(-1) for p in final.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        result = {
            "history": [{k: e.get(k) for k in ("step", "event", "sites", "scores", "reason")}
                        for e in bp.history],
            "max_weight_gap": float((gathered[0] - gathered[1]).abs().max()),
            "wrapped": sorted(set(wrapped)), "cycles": bp.cycle, "failures": bp.failures,
            "same_object": final is model,
        }
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_ranks_agree_and_end_identical(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    r0, r1 = results
    assert r0["history"] == r1["history"], "every rank took the same decisions"
    extends = [e for e in r0["history"] if e["event"] == "extend"]
    assert len(extends) >= 3 and all(len(e["sites"]) == 2 for e in extends)
    assert extends[0]["scores"] and set(extends[0]["scores"]) == {"0", "2", "4"}
    rollbacks = [e for e in r0["history"] if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and "non-finite" in rollbacks[0]["reason"]
    assert r0["cycles"] == r1["cycles"] >= 2 and r0["failures"] == r1["failures"] == 1
    assert r0["max_weight_gap"] == 0.0, "identical weights on every rank"
    assert r0["wrapped"] == ["DistributedDataParallel"] and r0["same_object"]
