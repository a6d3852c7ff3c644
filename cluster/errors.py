"""The error of the cluster layer: what a user can change when the cluster cannot host a job."""

from __future__ import annotations


class ClusterError(Exception):
    """The cluster cannot be reached or cannot host the job; the message says what to change."""
