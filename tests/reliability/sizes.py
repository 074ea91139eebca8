"""How big the reliability cases are: CI sizes by default, the issue's full sizes under
PREFLOOP_RELIABILITY_FULL=1 (about half an hour on a 2-core machine)."""

from __future__ import annotations

import os

FULL = os.environ.get("PREFLOOP_RELIABILITY_FULL") == "1"

LOAD_ANNOTATORS = 50
LOAD_VOTES_EACH = 200 if FULL else 10
KILLS = 20 if FULL else 3
KILL_ANNOTATORS = 10
BIG_FILE_MB = (1, 100) if FULL else (1,)
JUDGE_PAIRS = 150 if FULL else 60
# pyproject's per-test timeout (600 s) fits the CI sizes; the full sizes need longer.
TIMEOUT_S = 3600 if FULL else 600
