from __future__ import annotations

from typing import ClassVar, Literal

from services.common.settings import ServiceSettings

VerifierPolicy = Literal["assigned", "grid"]
"""Who decides a verification: the worker it is asked of (``assigned``), or any worker of its grid but the one who
reported the incident (``grid``). Under either, whoever did the work being verified never decides it."""


class VerificationSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "verification"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8103

    verifier_policy: VerifierPolicy = "assigned"
    """``assigned``: only the worker a verification is asked of decides it; ``grid``: any worker of its grid but
    the reporter and whoever did the work."""
