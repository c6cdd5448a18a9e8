"""Monitoring over loopguard's durable records: windows, findings, costs, incidents.

This package reads records (``guard.records`` writes them, one JSON line per call)
and imports nothing else from ``guard`` or ``adapters``: the proxy may change shape
without the monitor noticing, and the monitor runs where the proxy does not.

- ``load_policy(path) -> Policy``: the TOML policy and its rate cards;
- ``LiveMonitor(policy)``: ``add(record)`` per record, ``status()`` for ``/status``;
- ``guard.monitor.report.build_report``: the batch report behind ``loopguard report``.

Per-call definitions (unsafe serve, abstention, first failed stage, throughput, cost)
live in ``guard.monitor.definitions``; the rules in ``guard.monitor.findings``.
"""

from guard.monitor.live import LiveMonitor
from guard.monitor.policy import Policy, PolicyError, RateCard, load_policy

__all__ = ["LiveMonitor", "Policy", "PolicyError", "RateCard", "load_policy"]
