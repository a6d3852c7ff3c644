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


@pytest.mark.integration
def test_a_client_without_the_token_cannot_join_the_local_ray(ray_session, tmp_path):
    """The local Ray (as `ray_cluster` and this session start it) wants Ray's auth token: a driver that has
    none (another HOME, no RAY_AUTH_TOKEN) or a wrong one is refused, wherever it connects from."""
    import os
    import subprocess
    import sys

    import ray

    gcs = ray.get_runtime_context().gcs_address
    probe = f"import ray; ray.init(address={gcs!r}, log_to_driver=False); print('joined')"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}):
        env = {**clean, "HOME": str(tmp_path), **extra}
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "joined" not in proc.stdout, (extra, proc.stdout, proc.stderr[-1500:])
        assert "token" in proc.stderr.lower()  # refused for the token, not for anything else
    # the same probe with this user's token joins: the refusals above are about the token, not the address
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "joined" in proc.stdout, proc.stderr[-1500:]
