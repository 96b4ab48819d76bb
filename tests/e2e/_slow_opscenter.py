"""opscenter with one slow read, for tests/e2e/test_opscenter_reads.py: ``python -m tests.e2e._slow_opscenter``.

The KPIs' read (``GET /api/kpis``) reads the read model as ever, then holds its unit of work open for
``GRIDLOOP_TEST_SLOW_READ_S`` seconds, as a report over a long history did; when it begins it writes the time to
the file ``GRIDLOOP_TEST_SLOW_READ_MARK``. Everything else is the service as it runs.
"""

from __future__ import annotations

import os
import time
from datetime import date
from pathlib import Path
from typing import Any

from schemas.reference import Town
from services.opscenter import handlers
from services.opscenter.app import build
from services.opscenter.kpis import Dimension, KpiReport, Period

SLOW_S = float(os.environ["GRIDLOOP_TEST_SLOW_READ_S"])
MARK = Path(os.environ["GRIDLOOP_TEST_SLOW_READ_MARK"])
_report_kpis = handlers.report_kpis


def slow_report(period: Period, at: date | None, by: Dimension, town: Town, uow: Any) -> KpiReport:
    MARK.write_text(f"{time.time()}")
    report = _report_kpis(period, at, by, town, uow)
    time.sleep(SLOW_S)
    return report


handlers.report_kpis = slow_report

if __name__ == "__main__":
    build().run()
