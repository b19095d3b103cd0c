"""The HTTP service of a guard, its OOD-rate monitoring and its decision log.

Needs the ``serve`` extra (FastAPI, uvicorn, SQLAlchemy, prometheus_client): ``pip install oodguard[serve]``.
"""

from oodguard.serve.app import create_app
from oodguard.serve.monitor import OODRateMonitor, ServiceMetrics, WindowStatus, ood_rate_pvalue
from oodguard.serve.store import DecisionLog, read_decisions, summarise

__all__ = [
    "DecisionLog",
    "OODRateMonitor",
    "ServiceMetrics",
    "WindowStatus",
    "create_app",
    "ood_rate_pvalue",
    "read_decisions",
    "summarise",
]
