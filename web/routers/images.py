"""Images: the worklist (`/`), the case page, and the image files (any logged-in user)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from db import audit, cases, lesions, readmodel
from db import dicom as dicom_queries
from db import worklist as worklist_queries
from db.images import find_image_by_sha256
from db.schema import ImageStatus, User, Verdict
from web import files
from web.deps import (
    MAX_PAGE,
    CurrentUser,
    DbSession,
    base_path,
    clinics_of,
    config,
    image_or_404,
    may_see,
    now,
)

router = APIRouter(tags=["images"])
PAGE_SIZE = 50


#: The page's own yes/no and the API's true/false (as links and bookmarks are written by hand).
_YES_NO = {"yes": True, "true": True, "1": True, "on": True,
           "no": False, "false": False, "0": False, "off": False}


def _yes_no(value: str | None) -> bool | None:
    return _YES_NO.get((value or "").strip().lower())


def _day(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def parse_filter(params: dict[str, str]) -> worklist_queries.WorklistFilter:
    """The worklist's filter from its query string; values it cannot read are ignored."""
    status = params.get("status") or None
    start, end = _day(params.get("from")), _day(params.get("to"))
    return worklist_queries.WorklistFilter(
        status=ImageStatus(status) if status in set(ImageStatus) else None,
        flagged=_yes_no(params.get("flagged")), reviewed=_yes_no(params.get("reviewed")),
        received_from=datetime.combine(start, datetime.min.time(), UTC) if start else None,
        received_before=(datetime.combine(end, datetime.min.time(), UTC) + timedelta(days=1)
                         if end else None),
        clinic=params.get("clinic") or None, search=(params.get("q") or "").strip()[:200] or None)


@router.get("/", summary="login: the worklist")
def worklist(request: Request, session: DbSession, user: CurrentUser) -> Response:
    """Unreviewed flagged images first, highest probability first, then the rest; filters, pages."""
    params = {k: v for k, v in request.query_params.items() if k not in ("page", "done") and v}
    for key in ("flagged", "reviewed"):  # shown and linked in the form's own words
        if key in params:
            said = _yes_no(params.pop(key))
            if said is not None:
                params[key] = "yes" if said else "no"
    try:
        page = max(1, int(request.query_params.get("page", "1")))
    except ValueError:
        page = 1
    if page > MAX_PAGE:
        raise HTTPException(422, f"page: at most {MAX_PAGE}")
    where = parse_filter(params)
    # A reviewer given clinics (`users set-prefixes`) sees theirs unless they pick one or all;
    # with clinic access enforced, theirs only.
    mine = tuple(p for p in user.prefixes.split("\n") if p)
    allowed = clinics_of(request, user)
    if allowed is not None:
        where = replace(where, prefixes=allowed)
    elif mine and not where.clinic and params.get("all") != "1":
        where = replace(where, prefixes=mine)
    rows = readmodel.image_rows(session, worklist_queries.worklist(
        session, where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE))
    total = worklist_queries.worklist_count(session, where)

    def page_link(number: int) -> str:
        return f"{base_path(request)}/?" + urlencode({**params, "page": number})

    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    return request.app.state.templates.TemplateResponse(request, "worklist.html", {
        "user": user, "rows": rows, "total": total, "page": page, "pages": pages, "params": params,
        "done": request.query_params.get("done") == "1",
        "my_clinics": where.prefixes,
        "all_link": f"{base_path(request)}/?" + urlencode({**params, "all": "1"}),
        "previous": page_link(page - 1) if page > 1 else None,
        "next": page_link(page + 1) if page < pages else None,
        "statuses": [s.value for s in ImageStatus],
        "clinics": [c for c in worklist_queries.clinics(session)
                    if allowed is None or any(f"{c}/".startswith(p) or p.startswith(f"{c}/")
                                              for p in allowed)],
    })


def reading_prefixes(request: Request, user: User) -> tuple[str, ...]:
    """The sources a user reads through by default: their clinics (with access enforced, the
    only ones they may see), else every image."""
    allowed = clinics_of(request, user)
    return allowed if allowed is not None else tuple(p for p in user.prefixes.split("\n") if p)


@router.get("/images/{sha256}", summary="login: the case page (audited)")
def case_page(request: Request, session: DbSession, user: CurrentUser, sha256: str) -> Response:
    """Everything about one image, and the review form; the view is written to the audit log."""
    case = cases.find_case(session, sha256)
    if case is None or not may_see(request, user, case.image):
        raise HTTPException(404, "no such image")
    audit.audit(session, user=user, username=user.name, action="view_image", now=now(),
                  image_id=case.image.id)
    session.commit()
    latest = case.predictions[0] if case.predictions else None
    classes = sorted(latest.probabilities, key=lambda c: -float(latest.probabilities[c])) if latest else []
    has_overlay = files.overlay_path(config(request).overlays_dir, case.image.sha256) is not None
    prefixes = reading_prefixes(request, user)
    previous, following = worklist_queries.neighbours(session, case.image, prefixes)
    allowed = clinics_of(request, user)
    dicom_facts = dicom_queries.instances_of(session, [case.image.id]).get(case.image.id)
    return request.app.state.templates.TemplateResponse(request, "case.html", {
        "user": user, "case": case, "image": case.image, "latest": latest, "classes": classes,
        "has_overlay": has_overlay, "verdicts": [v.value for v in Verdict],
        "diagnoses": sorted(latest.probabilities) if latest else [],
        "previous": previous, "following": following,
        "waiting": worklist_queries.unreviewed_count(session, prefixes),
        # A DICOM image's patient is its header's (below), never its path's (dicom/<AE>/...).
        "related": (lesions.PatientImages(None, None) if dicom_facts is not None
                    else lesions.other_images_of_patient(session, case.image, allowed or ())),
        "audit": audit.audit_page(session, limit=20, offset=0, sha256=case.image.sha256),
        "dicom": dicom_facts,
        "same_patient": [(other, facts) for other, facts
                         in dicom_queries.other_images_of_patient(session, case.image.id)
                         if may_see(request, user, other)],
    })


@router.get("/next", summary="login: the next unreviewed flagged case")
def next_case(request: Request, session: DbSession, user: CurrentUser) -> Response:
    """Redirect to the highest unreviewed flagged case (after `?after=<sha256>` when given), or
    to the worklist when none is left."""
    after = request.query_params.get("after")
    current = find_image_by_sha256(session, after) if after else None
    found = worklist_queries.next_unreviewed(session, current, reading_prefixes(request, user))
    if found is None:
        return RedirectResponse(f"{base_path(request)}/?done=1", status_code=303)
    return RedirectResponse(f"{base_path(request)}/images/{found.sha256}", status_code=303)


def _private(response: Response) -> Response:
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@router.get("/images/{sha256}/file", summary="login: the stored image")
def image_file(request: Request, session: DbSession, user: CurrentUser, sha256: str) -> Response:
    """The image at full size."""
    image = image_or_404(session, sha256, request, user)
    location = files.shown_location(config(request).previews, image.sha256, image.location)
    try:
        media_type = files.browser_type(location)
        if media_type is not None:
            # Streamed from disk in chunks: a large file never sits in memory whole.
            return _private(FileResponse(location, media_type=media_type))
        return _private(Response(files.converted_png(location), media_type="image/png"))
    except files.NotShowable:
        raise HTTPException(404, "this file cannot be shown") from None


@router.get("/images/{sha256}/thumbnail", summary="login: a thumbnail")
def image_thumbnail(request: Request, session: DbSession, user: CurrentUser, sha256: str) -> Response:
    """The small JPEG the worker stored at screening time, streamed; 404 when there is none
    (not screened yet, or not an image)."""
    image = image_or_404(session, sha256, request, user)
    path = files.stored_thumbnail(config(request).thumbnails_dir, image.sha256)
    if path is None:
        raise HTTPException(404, "no thumbnail stored for this image")
    return _private(FileResponse(path, media_type="image/jpeg"))


@router.get("/images/{sha256}/overlay", summary="login: the stored Grad-CAM overlay")
def image_overlay(request: Request, session: DbSession, user: CurrentUser, sha256: str) -> Response:
    """The Grad-CAM overlay the worker stored (made for the alert), else 404."""
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise HTTPException(404, "no such image")
    image_or_404(session, sha256, request, user)
    path = files.overlay_path(config(request).overlays_dir, sha256)
    if path is None:
        raise HTTPException(404, "no overlay stored for this image")
    return _private(FileResponse(path, media_type="image/png"))
