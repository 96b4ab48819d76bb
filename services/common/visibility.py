"""Who sees what of an incident: the one place that decides, for every API that shows one.

- **A citizen's contact.** An incident reported on a citizen's channel — the 12345 hotline, whose ``reporter_id``
  is the caller's phone number, or Open311, whose reporter of record is the application that posted it for a
  citizen — names its reporter only to the operations center and administrators (and to the reporter of record
  itself). Department staff and grid workers working the case see the incident without it, and without the id
  of an actor of kind ``citizen`` in its timeline. A grid worker's or a sensor's ``reporter_id`` is a staff
  member's or a device's id, not anyone's contact: whoever may see the incident sees it, as they see who acted
  on each step.
- **Not yours is unknown.** A work order, verification task or incident the caller may not see is answered
  exactly as one that does not exist (404, the same reason word for word, :func:`unseen`), alone or as an item of
  a batch: a 403 would tell that it exists and, from who may see it, who owns it. Refusals of a role (a
  department calling the operations center's routes) or of a body naming someone else stay 403: they tell
  nothing about a resource.
- **The public** (Open311's reads, without a key) sees only incidents of a public category
  (``Category.public``): the others — a 群租 flat, a building's illegal extension, a hazard inside a warehouse —
  are absent from every listing and unknown by id. Of a public one it sees the category, the coordinates, the
  status and the departments, never the reporter, and no words of staff: handling results, return reasons,
  verification notes and escalations stay inside, and so do a report's description, address and photo unless a
  citizen posted them through Open311 (a grid worker's or the hotline desk's words are staff's).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from schemas import ActorKind
from schemas.events import Source

from .auth import Principal, Role
from .errors import NotFound

CITIZEN_SOURCES: frozenset[str] = frozenset({Source.HOTLINE_12345.value, Source.OPEN311.value})
"""Channels whose reporter is a citizen: their ``reporter_id`` is a contact (a phone number) or stands for one."""


PUBLIC_WORDS_SOURCES: frozenset[str] = frozenset({Source.OPEN311.value})
"""Channels whose report's own words (description, address, photo) the public may read: what a citizen posted
to the public gateway. Everyone else's were written down by staff."""


def sees_contacts(who: Principal) -> bool:
    """The operations center and administrators see citizens' contacts."""
    return who.sees_everything


def reporter(who: Principal, source: str, reporter_id: str) -> str | None:
    """The ``reporter_id`` ``who`` is shown of an incident reported on ``source``: None for a citizen's."""
    if source not in CITIZEN_SOURCES or sees_contacts(who) or reporter_id == who.subject:
        return reporter_id
    return None


def actor(who: Principal, actor_kind: str, actor_id: str) -> str | None:
    """The id ``who`` is shown of the actor of a transition: None for a citizen."""
    if actor_kind != ActorKind.CITIZEN.value or sees_contacts(who) or actor_id == who.subject:
        return actor_id
    return None


def sees_incident(who: Principal, reporter_id: str, grid_id: str | None, departments: Collection[str]) -> bool:
    """Whether ``who`` may see an incident: the center and administrators every one; a department those it holds
    (or held) a work order of; a grid worker those of their grids and those they reported; anyone else (a
    hotline desk, a sensor, an Open311 application) those it reported."""
    if who.sees_everything:
        return True
    if who.role is Role.DEPARTMENT:
        return who.department in departments
    if who.role is Role.GRID_WORKER:
        return reporter_id == who.subject or grid_id in who.grids
    return reporter_id == who.subject


def sees_work_order(who: Principal, department_code: str) -> bool:
    """Whether ``who`` may see a work order: department staff only their own office's; the readers of every
    department's queue (the center, administrators) all of them."""
    return who.role is not Role.DEPARTMENT or who.department == department_code


def verifier_grids(who: Principal) -> tuple[str, ...] | None:
    """The grid cells whose verification tasks ``who`` sees and decides: a grid worker's own; None: every grid
    (the center and administrators, who act on a named worker's behalf)."""
    return who.grids if who.role is Role.GRID_WORKER else None


def sees_task(grids: Iterable[str] | None, grid_id: str) -> bool:
    """Whether a caller with :func:`verifier_grids` ``grids`` sees a verification task of ``grid_id``."""
    return grids is None or grid_id in grids


def unseen(what: str, ident: str) -> NotFound:
    """The refusal of an ``ident`` the caller may not see, the same as for one that does not exist."""
    return NotFound(f"no {what} {ident}")


def publicly_listed(category_code: str, public: Collection[str]) -> bool:
    """Whether the public reads incidents of this category, of a town whose public categories are ``public``
    (``Town.public_categories``)."""
    return category_code in public


def public_words(source: str) -> bool:
    """Whether the public reads a report's own words (description, address, photo), by the channel it came on."""
    return source in PUBLIC_WORDS_SOURCES


__all__ = [
    "CITIZEN_SOURCES",
    "PUBLIC_WORDS_SOURCES",
    "actor",
    "public_words",
    "publicly_listed",
    "reporter",
    "sees_contacts",
    "sees_incident",
    "sees_task",
    "sees_work_order",
    "unseen",
    "verifier_grids",
]
