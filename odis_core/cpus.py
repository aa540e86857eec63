"""How many data-loading processes every command starts by default."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """min(8, available CPUs): never more loader processes than cores (torch's DataLoader
    warns above that: 4 did on a 2-core machine), and at most 8 so a many-core node does
    not start dozens per command; pass --workers to go higher on a GPU node."""
    return min(8, available_cpus())
