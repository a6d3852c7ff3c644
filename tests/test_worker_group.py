"""The SPMD worker group: rank layout (node order, one node's ranks consecutive, the torchrun variables), and a real
run of two workers on the session's Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneyard.cluster.worker_group import PlacedWorker, order_ranks, rank_environments


def placed(name: str, node_id: str, node_ip: str, gpus: list[str] | None = None) -> PlacedWorker:
    return PlacedWorker(actor=name, node_id=node_id, node_ip=node_ip, gpus=gpus or [])


def test_ranks_start_on_the_driver_node_and_keep_each_node_together():
    workers = [
        placed("a", "n2", "10.0.0.2"),
        placed("b", "n1", "10.0.0.1"),
        placed("c", "n2", "10.0.0.2"),
        placed("d", "n3", "10.0.0.3"),
    ]
    ordered = order_ranks(workers, driver_ip="10.0.0.3")
    assert [s.actor for s in ordered] == ["d", "b", "a", "c"]
    envs = rank_environments(ordered)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["NODE_RANK"] for e in envs] == ["0", "1", "2", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "0", "1"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["1", "1", "2", "2"]
    assert all(e["WORLD_SIZE"] == "4" for e in envs)
    assert not any("CUDA_VISIBLE_DEVICES" in e for e in envs)


def test_two_ray_nodes_on_one_host_are_two_nodes():
    """The tests' two-node Ray runs both nodes on 127.0.0.1: ranks group by node id, not by address."""
    workers = [placed("a", "n1", "127.0.0.1"), placed("b", "n2", "127.0.0.1"), placed("c", "n1", "127.0.0.1")]
    ordered = order_ranks(workers, driver_ip="127.0.0.1")
    envs = rank_environments(ordered)
    by_node = [(s.node_id, e["LOCAL_RANK"], e["NODE_RANK"]) for s, e in zip(ordered, envs, strict=True)]
    assert by_node == [("n1", "0", "0"), ("n1", "1", "0"), ("n2", "0", "1")]


def test_a_node_s_workers_see_its_gpus_and_local_rank_is_the_own_gpu():
    """cuda:LOCAL_RANK among the node's visible GPUs is the GPU Ray gave the worker (ids sort as numbers)."""
    workers = [
        placed("on-10", "n1", "10.0.0.1", ["10"]),
        placed("on-2", "n1", "10.0.0.1", ["2"]),
        placed("on-9", "n1", "10.0.0.1", ["9"]),
        placed("other", "n2", "10.0.0.2", ["0"]),
    ]
    ordered = order_ranks(workers, driver_ip="10.0.0.1")
    envs = rank_environments(ordered)
    assert [s.actor for s in ordered] == ["on-2", "on-9", "on-10", "other"]
    for s, env in zip(ordered, envs, strict=True):
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert visible[int(env["LOCAL_RANK"])] == s.gpus[0]
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == "2,9,10" and envs[3]["CUDA_VISIBLE_DEVICES"] == "0"


def record_worker(payload: dict, rank: int) -> None:
    """A worker entry: what this rank sees (its environment, the process group, a refused import) into a file."""
    import torch.distributed as dist

    try:
        import bitsandbytes  # noqa: F401

        refused = False
    except ImportError:
        refused = True
    seen = {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")}
    seen.update(world=dist.get_world_size(), bitsandbytes_refused=refused)
    (Path(payload["out"]) / f"rank-{rank}.json").write_text(json.dumps(seen))


@pytest.mark.integration
def test_the_workers_set_their_own_environment_join_one_group_and_keep_absent_packages_out(
    ray_session, tmp_path, monkeypatch
):
    """run() sets worker_env: no runtime_env carries it (one keeps the workers out of Ray's prestarted processes)."""
    from tuneyard.cluster.config import ClusterConfig
    from tuneyard.cluster.worker_group import run_spmd_workers

    # set after the session's Ray started, so a worker sees it only if run() sets it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    cluster = ClusterConfig(workers=2)
    run_spmd_workers("tests.test_worker_group:record_worker", {"out": str(tmp_path)}, cluster, absent=("bitsandbytes",))
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, ranked in enumerate(seen):
        assert ranked["RANK"] == ranked["LOCAL_RANK"] == str(rank)
        assert ranked["OMP_NUM_THREADS"] == "1" and ranked["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "extensions")
        assert ranked["world"] == 2 and ranked["bitsandbytes_refused"]
