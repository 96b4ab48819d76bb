"""opscenter with one slow read, for tests/e2e/test_opscenter_reads.py: ``python -m tests.e2e._slow_opscenter``.

The backlog's read (``GET /api/backlog``) reads the read model as ever, then holds its unit of work open for
``GRIDLOOP_TEST_SLOW_READ_S`` seconds, as a report over a long history would; when it begins it writes the time
to the file ``GRIDLOOP_TEST_SLOW_READ_MARK``. Everything else is the service as it runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from schemas.reference import Town
from services.opscenter import handlers, views
from services.opscenter.app import build

SLOW_S = float(os.environ["GRIDLOOP_TEST_SLOW_READ_S"])
MARK = Path(os.environ["GRIDLOOP_TEST_SLOW_READ_MARK"])
_show_backlog = handlers.show_backlog


def slow_backlog(town: Town, uow: Any) -> list[views.Backlog]:
    MARK.write_text(f"{time.time()}")
    backlog = _show_backlog(town, uow)
    time.sleep(SLOW_S)
    return backlog


handlers.show_backlog = slow_backlog

if __name__ == "__main__":
    build().run()
