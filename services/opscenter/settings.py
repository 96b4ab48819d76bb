from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import ServiceSettings, Tuning


class OpsCenterTuning(Tuning):
    batch_linger_s: float = Field(default=0.25, ge=0, le=5)
    """It folds the lifecycle log into a view: up to 250 ms more for bigger batches (less CPU per record)."""
    fetch_min_bytes: int = Field(default=256 * 1024, ge=1, le=64 * 1024 * 1024)
    """And it asks the broker for the log in bigger pieces, fetching less often."""
    fetch_max_wait_ms: int = Field(default=250, ge=0, le=60_000)
    """A quarter of a second of the log at a time, not a record at a time. (intake, which
    folds the same log, does not: its batches would then hold its loop long enough to delay the reports it
    answers and publishes.)"""


class OpsCenterSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "opscenter"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8104
    tuning: OpsCenterTuning = Field(default_factory=OpsCenterTuning)
    read_model_file: Path | None = None
    """Names the database a rebuilt read model was swapped into (``rebuild --swap``): once it exists, the
    service opens that database, not ``database_url``. Empty: ``<var_dir>/db/opscenter.read-model``."""

    @model_validator(mode="after")
    def _read_model_file(self) -> OpsCenterSettings:
        if self.read_model_file is None:
            self.read_model_file = self.var_dir / "db" / "opscenter.read-model"
        return self
