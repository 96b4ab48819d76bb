"""Actions on several items in one request (批量签收, 批量核查): one outcome per item, one commit for all.

A desk clearing its queue or a grid worker back from a round acts on many items at once. Each item is checked by
the same rules as the one-item action; an item the rules refuse is answered with its reason and code (403, 404,
409) and changes nothing, the others go ahead. Everything the accepted items change, and the events they emit,
is written in the one unit of work of the request: a database that fails at the commit records none of them
(answered 503, safe to repeat: items already acted on come back refused 409).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated

from pydantic import BaseModel, Field

from .errors import Forbidden, GridloopError, NotFound, Rejected

MAX_BATCH = 100
"""Items one request may act on."""

ItemId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@:-]+$")]

_CODES: dict[type[GridloopError], int] = {NotFound: 404, Forbidden: 403, Rejected: 409}


class ItemOutcome(BaseModel):
    """What became of one item: its new ``status``, or the ``code`` and ``error`` it was refused with."""

    id: str
    status: str | None = None
    code: int | None = None
    error: str | None = None


class BatchOutcome(BaseModel):
    """How many items were acted on and how many refused, and each item's outcome in the order asked."""

    done: int
    refused: int
    results: list[ItemOutcome]


def unique(ids: list[str]) -> list[str]:
    """A pydantic after-validator: an item named twice in one request is a mistake of the caller."""
    seen: set[str] = set()
    twice = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if twice:
        raise ValueError(f"named more than once: {', '.join(twice)}")
    return ids


def act_on_each(ids: Iterable[str], act: Callable[[str], str]) -> BatchOutcome:
    """``act(id)`` (returning the item's new status) for every id; a refusal of the rules is that item's outcome.

    ``act`` must raise before it writes anything for an item it refuses, as the one-item handlers do (they
    check, then compare-and-set, then emit); anything else it raises ends the whole request."""
    results: list[ItemOutcome] = []
    for item in ids:
        try:
            results.append(ItemOutcome(id=item, status=act(item)))
        except (NotFound, Forbidden, Rejected) as exc:
            results.append(ItemOutcome(id=item, code=_CODES[type(exc)], error=str(exc)))
    refused = sum(1 for r in results if r.code is not None)
    return BatchOutcome(done=len(results) - refused, refused=refused, results=results)


__all__ = ["MAX_BATCH", "BatchOutcome", "ItemId", "ItemOutcome", "act_on_each", "unique"]
