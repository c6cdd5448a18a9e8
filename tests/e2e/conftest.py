"""End-to-end tests: real subprocesses and a real browser. The seed case's data lives
in ``tests/unit/monitor_seed.py``; this puts that directory on the import path."""

from __future__ import annotations

import sys
from pathlib import Path

_UNIT = str(Path(__file__).resolve().parent.parent / "unit")
if _UNIT not in sys.path:
    sys.path.insert(0, _UNIT)
