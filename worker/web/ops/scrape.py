"""`GET /metrics`: the web process's counters, and the backlog gauges read from Postgres
at scrape time (worker.metrics.DatabaseGauges)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from worker import metrics
from worker.usecases import ops_queries
from worker.wiring import Root

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    root: Root = request.app.state.root
    gauges = metrics.DatabaseGauges(lambda: ops_queries.backlog(root.ctx))
    body, content_type = await run_in_threadpool(metrics.exposition, gauges)
    return Response(body, media_type=content_type)
