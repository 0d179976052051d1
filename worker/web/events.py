"""The event feed (issue 10): GET /v1/events, GET /v1/events/{id}, POST …/redeliver."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from worker.schemas import EventDetailView, EventPage, is_ulid
from worker.usecases import events
from worker.usecases.context import Context
from worker.web.deps import get_context, require_token

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["events"])

ContextDep = Annotated[Context, Depends(get_context)]
_ERR: dict[str, Any] = {"content": {"application/json": {}}}


def get_scope(producer: Annotated[str, Depends(require_token)]) -> events.Scope:
    """The caller's view of the feed: its producer's events (issue 13)."""
    return events.Scope(producer=producer)


ScopeDep = Annotated[events.Scope, Depends(get_scope)]


@router.get(
    "/events",
    response_model=EventPage,
    responses={404: {"description": "`after` names no listed event", **_ERR}},
)
def list_events(
    ctx: ContextDep,
    scope: ScopeDep,
    after: Annotated[str | None, Query(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")] = None,
    limit: Annotated[int, Query(ge=1, le=events.MAX_PAGE)] = 100,
) -> EventPage:
    """Outcome events in order, after the event `after`; pass `next_after` to go on."""
    try:
        return events.page(ctx, scope, after=after, limit=limit)
    except events.UnknownCursor:
        raise HTTPException(404, detail="after: no such event in the feed") from None


@router.get(
    "/events/{event_id}",
    response_model=EventDetailView,
    responses={404: {"description": "no such event", **_ERR}},
)
def get_event(event_id: str, ctx: ContextDep, scope: ScopeDep) -> EventDetailView:
    """One event with its deliveries and every try (time, HTTP status or error)."""
    found = events.detail(ctx, scope, event_id) if is_ulid(event_id) else None
    if found is None:
        raise HTTPException(404, detail="event not found")
    return found


@router.post(
    "/events/{event_id}/redeliver",
    status_code=202,
    responses={
        404: {"description": "no such event", **_ERR},
        409: {"description": "no dead delivery to send again", **_ERR},
    },
)
def redeliver_event(event_id: str, ctx: ContextDep, scope: ScopeDep) -> dict[str, int]:
    """Send a dead event again (its deliveries get a fresh retry horizon)."""
    revived = events.redeliver(ctx, scope, event_id) if is_ulid(event_id) else None
    if revived is None:
        raise HTTPException(404, detail="event not found")
    if revived == 0:
        raise HTTPException(409, detail="no dead delivery to send again")
    return {"redelivering": revived}
