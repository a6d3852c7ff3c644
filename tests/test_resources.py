"""Workers that can never fit on the Ray cluster are refused with the arithmetic, or waited for on an autoscaler."""

from __future__ import annotations

import pytest

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.ray_cluster import ClusterError
from tuneyard.cluster.resources import check_request, shortfall, wait_for_resources


def message(workers: int, cpus: float, gpus: float, nodes: list[dict], placement: str = "pack") -> str:
    with pytest.raises(ClusterError) as caught:
        check_request(workers, cpus, gpus, placement, nodes)
    return str(caught.value)


def test_too_many_cpus_in_all():
    text = message(64, 1, 0, [{"CPU": 2.0}])
    assert text.startswith(
        "cluster.workers 64 x cluster.cpus_per_worker 1 = 64 CPUs, but the Ray cluster has 2 CPUs (1 node: 2); "
    )
    assert "lower cluster.workers or cluster.cpus_per_worker" in text


def test_gpus_on_a_cluster_without_any():
    text = message(2, 1, 1, [{"CPU": 8.0}, {"CPU": 8.0}])
    assert text.startswith(
        "cluster.workers 2 x cluster.gpus_per_worker 1 = 2 GPUs, but the Ray cluster has 0 GPUs (2 nodes: 0, 0); "
    )
    assert "set cluster.gpus_per_worker: 0 to train on CPUs" in text


def test_a_worker_bigger_than_any_node():
    text = message(2, 3, 0, [{"CPU": 2.0}] * 3)
    assert "one worker asks for cluster.cpus_per_worker 3 CPUs, but no node of the Ray cluster has that many" in text
    assert "(3 nodes: 2, 2, 2): a worker runs on one node" in text


def test_enough_in_all_but_not_per_node():
    # 6 CPUs in all for 3 x 2, but a node of 3 holds one such worker only
    text = message(3, 2, 0, [{"CPU": 3.0}, {"CPU": 3.0}])
    assert (
        "cluster.workers 3 of 2 CPU each do not fit: the Ray cluster's nodes hold 1, 1 such workers (2 in all)" in text
    )
    # a worker needs its CPU and its GPU on the same node
    text = message(2, 1, 1, [{"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}])
    assert "cluster.workers 2 of 1 CPU + 1 GPU each do not fit: the Ray cluster's nodes hold 1, 0 such workers" in text


def test_strict_spread_needs_a_node_per_worker():
    text = message(3, 1, 0, [{"CPU": 4.0}, {"CPU": 4.0}], placement="strict_spread")
    assert "cluster.placement strict_spread puts each of the cluster.workers 3 on its own node" in text
    assert "only 2 of the Ray cluster's 2 nodes can hold a worker (1 CPU)" in text
    assert shortfall(3, 1, 0, "pack", [{"CPU": 4.0}, {"CPU": 4.0}]) is None


def test_requests_that_fit():
    assert shortfall(2, 1, 0, "pack", [{"CPU": 2.0}]) is None
    assert shortfall(10, 0.1, 0, "pack", [{"CPU": 1.0}]) is None  # float sums must not miss an exact fit
    assert shortfall(4, 2, 1, "spread", [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]) is None
    assert shortfall(2, 1, 0, "strict_spread", [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]) is None


def test_a_local_ray_is_refused_at_once():
    lines: list[str] = []
    cfg = ClusterConfig(workers=2, gpus_per_worker=1, start_timeout_s=30)  # no address: nothing will grow
    with pytest.raises(ClusterError, match="0 GPUs") as caught:
        wait_for_resources(cfg, read_nodes=lambda: [{"CPU": 2.0}], notify=lines.append)
    assert lines == [] and "start_timeout_s" not in str(caught.value)


def test_an_address_without_timeout_fails_at_once_and_names_the_timeout():
    cfg = ClusterConfig(address="10.0.0.1:6379", workers=64)
    with pytest.raises(ClusterError) as caught:
        wait_for_resources(cfg, read_nodes=lambda: [{"CPU": 2.0}], notify=pytest.fail)
    assert "= 64 CPUs, but the Ray cluster has 2 CPUs" in str(caught.value)
    assert "cluster.start_timeout_s" in str(caught.value)


def test_an_autoscaling_cluster_is_waited_for():
    sizes = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 64.0}]])
    lines: list[str] = []
    cfg = ClusterConfig(address="10.0.0.1:6379", workers=64, start_timeout_s=30)
    wait_for_resources(cfg, read_nodes=lambda: next(sizes), notify=lines.append, poll_s=0.01)
    assert len(lines) == 2
    assert lines[0].startswith("waiting for resources: need 64 CPUs, have 2 ... ")
    assert lines[0].endswith(" s left (cluster.start_timeout_s)")


def test_an_autoscaling_cluster_that_does_not_grow_in_time():
    lines: list[str] = []
    cfg = ClusterConfig(address="10.0.0.1:6379", workers=64, start_timeout_s=0.3)
    with pytest.raises(ClusterError) as caught:
        wait_for_resources(cfg, read_nodes=lambda: [{"CPU": 2.0}], notify=lines.append, poll_s=0.05)
    assert len(lines) >= 2
    assert "= 64 CPUs, but the Ray cluster has 2 CPUs (1 node: 2)" in str(caught.value)
    assert "after waiting cluster.start_timeout_s 0.3 s" in str(caught.value)


@pytest.mark.integration
def test_the_real_ray_is_read(ray_session):
    import os

    cpus = max(os.cpu_count() or 1, 2)  # what the ray_session fixture gave its Ray
    wait_for_resources(ClusterConfig(workers=2))
    with pytest.raises(ClusterError) as caught:
        wait_for_resources(ClusterConfig(workers=64))
    assert f"cluster.workers 64 x cluster.cpus_per_worker 1 = 64 CPUs, but the Ray cluster has {cpus} CPUs" in str(
        caught.value
    )
