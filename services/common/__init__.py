"""What every gridloop service is built from: settings, unit of work, outbox, Kafka runtime, errors."""

from .errors import GridloopError, NotFound, PoisonMessage, Rejected, UnknownIncident
from .settings import ServiceSettings

__all__ = ["GridloopError", "NotFound", "PoisonMessage", "Rejected", "ServiceSettings", "UnknownIncident"]
