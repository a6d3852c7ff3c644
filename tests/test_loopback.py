"""The test clusters stay on loopback: inside the private network namespace `make test` uses where the
machine allows (`unshare -n`, loopback up), Ray has no other address to take, and no node may have one.
The two-node test Ray is checked the same way in test_cluster_ray.py."""

from __future__ import annotations

import ipaddress
import socket

import pytest

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def only_loopback_here() -> bool:
    """Whether this process sees no network interface but `lo` (a private network namespace)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


needs_private_network = pytest.mark.skipif(
    not only_loopback_here(),
    reason="outside a private network namespace Ray rewrites 127.0.0.1 to the primary address; "
    "`make test` runs the suite in one where the machine allows (root: unshare -n)",
)


@pytest.mark.integration
@needs_private_network
def test_the_session_ray_has_only_loopback_nodes(ray_session):
    import ray

    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    assert addresses and all(ipaddress.ip_address(a) in LOOPBACK for a in addresses), addresses
