"""The operations console (issue 11): sign-in, Overview and Lookup, server-rendered.

Every page is a Jinja2 template with autoescaping on: whatever kod.mobi or a producer sent
(callback bodies, recipients, reasons, keys) is shown as text. A page never shows a
code, and shows recipients masked. Bad input gets a page that says what was wrong; a
database that cannot answer gets a 503 page; nothing here answers 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from worker.logging import get_logger
from worker.usecases import ops_queries
from worker.web.ops.session import COOKIE, SESSION_S, Sessions
from worker.wiring import Root

router = APIRouter(prefix="/ops", include_in_schema=False)
log = get_logger("worker.ops")

#: The overview reloads itself this often.
REFRESH_S = 15
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%"


templates = Environment(
    loader=PackageLoader("worker.web.ops", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(seconds=_seconds, when=_when, percent=_percent)


def _sessions(request: Request) -> Sessions:
    sessions: Sessions | None = getattr(request.app.state, "ops_sessions", None)
    if sessions is None:
        root: Root = request.app.state.root
        sessions = Sessions(
            root.settings.ops_tokens, root.settings.callback_secret.get_secret_value()
        )
        request.app.state.ops_sessions = sessions
    return sessions


def _signed_in(request: Request) -> bool:
    return _sessions(request).valid(request.cookies.get(COOKIE))


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def problem(title: str, detail: str, status: int, *, signed_in: bool = True) -> HTMLResponse:
    return page("problem.html", status, title=title, detail=detail, signed_in=signed_in)


def _to_signin() -> Response:
    return RedirectResponse("/ops/signin", status_code=303, headers=HEADERS)


async def _guarded(
    request: Request, render: Callable[[Root], Awaitable[Response]]
) -> Response:
    """Signed-in pages: to the sign-in page without a session; a 503 page, never a 500,
    when reading fails."""
    if not _signed_in(request):
        return _to_signin()
    root: Root = request.app.state.root
    try:
        return await render(root)
    except Exception as exc:
        log.warning("ops.page_failed", path=request.url.path, error=type(exc).__name__)
        return problem(
            "The console cannot read the database right now",
            "Try again in a moment; the service's logs say more (event ops.page_failed).",
            503,
        )


# -- sign-in -----------------------------------------------------------------------------


@router.get("/signin")
async def signin_form(request: Request) -> Response:
    if _signed_in(request):
        return RedirectResponse("/ops", status_code=303, headers=HEADERS)
    return page("signin.html", enabled=_sessions(request).enabled, signed_in=False)


@router.post("/signin")
async def signin(request: Request) -> Response:
    sessions = _sessions(request)
    if not sessions.enabled:
        return page("signin.html", 403, enabled=False, signed_in=False)
    try:
        form = await request.form()
        token = form.get("token")
    except Exception:
        token = None
    cookie = sessions.sign_in(token if isinstance(token, str) else "")
    if cookie is None:
        log.warning("ops.signin_refused")
        return page("signin.html", 401, enabled=True, refused=True, signed_in=False)
    root: Root = request.app.state.root
    response = RedirectResponse("/ops", status_code=303, headers=HEADERS)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_S,
        path="/ops",
        httponly=True,
        samesite="strict",
        secure=root.settings.public_base_url.startswith("https://"),
    )
    log.info("ops.signed_in")
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    response = _to_signin()
    response.delete_cookie(COOKIE, path="/ops", httponly=True, samesite="strict")
    return response


# -- overview ----------------------------------------------------------------------------


@router.get("")
async def overview(request: Request) -> Response:
    async def render(root: Root) -> Response:
        data = await run_in_threadpool(ops_queries.overview, root.ctx)
        return page("overview.html", o=data, chart=_chart(data.minutes), refresh_s=REFRESH_S)

    return await _guarded(request, render)


def _chart(minutes: list[ops_queries.Minute]) -> dict[str, Any]:
    """Bars for an inline SVG: delivered above the axis, failed below, one per minute."""
    width, half, gap = 10, 60, 2
    top = max([1, *(m.delivered for m in minutes), *(m.failed for m in minutes)])
    bars = []
    for i, m in enumerate(minutes):
        up = round(half * m.delivered / top)
        down = round(half * m.failed / top)
        bars.append(
            {
                "x": i * width,
                "up": up,
                "down": down,
                "title": f"{m.at:%H:%M} UTC: {m.delivered} delivered, {m.failed} failed",
            }
        )
    return {"bars": bars, "width": width * len(minutes), "half": half, "bar": width - gap,
            "top": top}


# -- lookup ------------------------------------------------------------------------------


@router.get("/lookup")
async def lookup_form(request: Request) -> Response:
    message_id = request.query_params.get("id")

    async def render(root: Root) -> Response:
        if not message_id:
            return page("lookup.html", result=None, query="")
        story = await run_in_threadpool(ops_queries.message_story, root.ctx, message_id)
        if story is None:
            return problem("No such message", "No message has that id.", 404)
        result = ops_queries.Lookup(message_id, ["message id"], [story])
        return page("lookup.html", result=result, query=message_id)

    return await _guarded(request, render)


@router.post("/lookup")
async def lookup(request: Request) -> Response:
    async def render(root: Root) -> Response:
        try:
            form = await request.form()
        except Exception:
            return problem("Unreadable search", "The form could not be read.", 400)
        query = form.get("q")
        query = query if isinstance(query, str) else ""
        try:
            result = await run_in_threadpool(ops_queries.lookup, root.ctx, query)
        except ops_queries.BadQuery as exc:
            return page("lookup.html", 400, result=None, query="", error=str(exc))
        status = 200 if result.messages else 404
        # The query is not echoed: it may be a full recipient (shown masked only).
        return page("lookup.html", status, result=result, query="")

    return await _guarded(request, render)
