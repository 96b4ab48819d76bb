"""The name this module had before ``services.common.http``: what a service's API imports from here is there."""

from .http import (
    RETRY_AFTER_S,
    ErrorReply,
    Problem,
    WaitS,
    allow,
    create_api,
    document_errors,
    settings_for,
)

__all__ = [
    "RETRY_AFTER_S",
    "ErrorReply",
    "Problem",
    "WaitS",
    "allow",
    "create_api",
    "document_errors",
    "settings_for",
]
