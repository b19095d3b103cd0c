"""Ray, the optional distributed engine (``pip install 'oodguard[ray]'``): imported lazily, connected once.

oodguard uses the Ray the user is connected to (``ray.init(address=...)`` before the call, or ``address=``), and
starts a local one only when there is none.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENGINES", "check_engine", "connect", "import_ray"]

#: Where distributed work runs: in this process, or on a Ray cluster.
ENGINES = ("local", "ray")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    return engine


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extraction runs on Ray Data)
    except ImportError as error:
        raise ImportError(f"engine='ray' needs Ray ({error}); pip install 'oodguard[ray]'") from error
    return ray


def connect(address: str | None = None) -> Any:
    """The ``ray`` module, connected: to ``address`` when given, to the running Ray when there is one (or
    ``RAY_ADDRESS`` names one), else to a new local Ray on this machine's cores (no dashboard)."""
    ray = import_ray()
    if ray.is_initialized():
        if address is not None:
            current = ray.get_runtime_context().gcs_address
            if address not in ("auto", current):
                raise ValueError(
                    f"address: Ray is already connected to {current}, not {address}; call ray.shutdown() first"
                )
        return ray
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray
