"""The review app: an ASGI app (FastAPI) with Jinja2 pages and a JSON API, every route behind a login.

`create_app(config)` builds it from plain values; `melanoscreen web` (and `up`) serve it with uvicorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo

import jinja2
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from db.session import make_session_factory
from service.colours import class_colour
from web.deps import CsrfRefused, Forbidden, LoginRequired, WebConfig, base_path, csrf_token, route_path
from web.routers import api, audit, auth, health, images, performance, reviews, users
from web.security import SessionPathAndBodyGuard

HERE = Path(__file__).resolve().parent
#: Routes anyone may call: the login form itself, the logout and the health check (for a
#: container's health probe; it says only "ok"). Everything else needs a login
#: (tests/test_web.py walks the route table against this list).
PUBLIC_PATHS = frozenset({"/login", "/logout", "/healthz"})
#: Every router of the app, one per resource (tests walk their routes).
ROUTERS = (auth.router, images.router, reviews.router, users.router, audit.router,
           performance.router, api.router, health.router)
#: Scripts only from the app's own files (the case page's `static/case.js`), never inline, no
#: frames, nothing from elsewhere: pages work with JavaScript off, and an HTML name that escaped
#: escaping still could not run. The image routes cannot serve as a script: they answer image
#: types with `nosniff`, which browsers refuse to run.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; img-src 'self' data:; "
                           "style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                           "base-uri 'none'")


def make_templates(timezone: str) -> Jinja2Templates:
    """The page templates (autoescaped), with filters for times and shares."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    zone = ZoneInfo(timezone)

    def local(when: datetime | None) -> str:
        return when.astimezone(zone).strftime("%Y-%m-%d %H:%M") if when else "—"

    def share(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.0f}%"

    def prob(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    env.filters.update(local=local, share=share, prob=prob)
    env.globals.update(csrf_token=csrf_token, timezone=timezone, class_colour=class_colour)
    return Jinja2Templates(env=env, context_processors=[lambda request: {"base": base_path(request)}])


def create_app(config: WebConfig) -> FastAPI:
    """The review app for this configuration."""
    app = FastAPI(title="MelanoScreen review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.sessions = make_session_factory(config.database_url)
    app.state.templates = make_templates(config.timezone)
    # Sessions live at their secret path, and bodies are refused unread without a login.
    app.add_middleware(SessionPathAndBodyGuard)

    @app.middleware("http")
    async def security_headers(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired) -> Response:
        path = route_path(request)
        if path.startswith("/api/"):
            return JSONResponse({"detail": "login required"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="melanoscreen"'})
        target = path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    def refused(request: Request, message: str) -> Response:
        """403: JSON for the API, a page (with a way back) for a person in a browser."""
        if route_path(request).startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=403)
        return app.state.templates.TemplateResponse(
            request, "refused.html", {"message": message, "user": None}, status_code=403)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, _exc: Forbidden) -> Response:
        return refused(request, "your role may not do this")

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, _exc: CsrfRefused) -> Response:
        return refused(request, "the form's CSRF token is missing or stale: reload the page")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": message or "invalid request", "errors": errors}, status_code=422)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app
