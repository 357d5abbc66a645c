"""A study's images and files: overlays drawn on request, downloads of its outputs."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from cxrbatch.db import Session
from cxrbatch.db.models import Image, Outcome
from cxrbatch.paths import resolve_stored
from cxrbatch.web.deps import Reading, State, Viewer, audited, study_view
from cxrbatch.web.render import SIZES, VIEW_PARTS, OverlayError, cached_overlay, cached_view

router = APIRouter()

# /files/<prefix>-<sop>: the outputs document's per-image group it is served from.
DOWNLOAD_GROUPS = {"seg": "seg", "key": "key_images", "gsps": "presentation_states"}


def _segmented(session: Session, uid: str, sop: str) -> tuple[Outcome, Image, str]:
    """The study's current outcome, its image `sop` and that image's stored SEG path;
    404 when it has no SEG."""
    outcome = study_view(session, uid).current
    image = next((i for i in outcome.images if i.sop_instance_uid == sop), None)
    if image is None or not image.seg_path:
        raise HTTPException(404, "no segmentation for this image")
    return outcome, image, image.seg_path


@router.get("/studies/{uid}/overlay/{sop}.png")
def overlay(
    uid: str,
    sop: str,
    web: State,
    who: Viewer,
    session: Reading,
    size: str = "thumb",
    maps: bool = False,
) -> Response:
    if size not in SIZES:
        raise HTTPException(400, f"size is one of {', '.join(SIZES)}")
    outcome, image, seg_path = _segmented(session, uid, sop)
    roots = web.site.roots
    source = resolve_stored(image.source_path, roots) if image.source_path else None
    stored_maps = ((outcome.outputs or {}).get("finding_maps") or {}).get(sop) if maps else None
    maps_file = resolve_stored(stored_maps, roots) if stored_maps else None
    seg = resolve_stored(seg_path, roots)
    try:
        data = cached_overlay(web.cache_dir, source, seg, size, maps_file)
    except (OverlayError, OSError) as exc:
        raise HTTPException(404, f"overlay not available: {exc}") from exc
    audited(web, who, "image_viewed", uid, f"{sop} {size}" + (" maps" if maps else ""))
    return Response(data, media_type="image/png")


@router.get("/studies/{uid}/view/{sop}/{part}")
def view(uid: str, sop: str, part: str, web: State, who: Viewer, session: Reading) -> Response:
    """The study page's viewer (static/viewer.js): `view.json` (size, value range, window,
    inversion), `pixels` (the Modality LUT values as gzip-compressed little-endian uint16
    codes) and `lungs.png` (the contours on a transparent layer). Shown to whoever sees the
    page, as the overlays are."""
    if part not in VIEW_PARTS:
        raise HTTPException(404, f"part is one of {', '.join(VIEW_PARTS)}")
    _, image, seg_path = _segmented(session, uid, sop)
    if not image.source_path:
        raise HTTPException(404, "no radiograph recorded for this image")
    roots = web.site.roots
    try:
        data = cached_view(
            web.cache_dir,
            resolve_stored(image.source_path, roots),
            resolve_stored(seg_path, roots),
            part,
        )
    except (OverlayError, OSError) as exc:
        raise HTTPException(404, f"viewer not available: {exc}") from exc
    if part == "view.json":
        audited(web, who, "image_viewed", uid, f"{sop} viewer")
        return Response(data, media_type="application/json")
    if part == "pixels":
        return Response(
            data, media_type="application/octet-stream", headers={"Content-Encoding": "gzip"}
        )
    return Response(data, media_type="image/png")


@router.get("/studies/{uid}/files/{kind}")
def download(uid: str, kind: str, web: State, who: Viewer, session: Reading) -> FileResponse:
    outputs = study_view(session, uid).current.outputs or {}
    stored: str | None = None
    if kind in ("sr", "json"):
        stored = outputs.get(kind)
    else:
        prefix, _, sop = kind.partition("-")
        group = DOWNLOAD_GROUPS.get(prefix)
        if group is not None:
            stored = (outputs.get(group) or {}).get(sop)
    if not stored:
        raise HTTPException(404, "no such file")
    if kind != "json" and not who.authenticated:
        # SEG, SR and key images carry the patient's name, ID and birth date.
        raise HTTPException(
            403,
            "the DICOM files carry patient identifiers: they are served to signed-in "
            "users only (configure [[web.users]] or a trusted proxy); result.json is "
            "available",
        )
    path = resolve_stored(stored, web.site.roots)
    if not path.is_file():
        raise HTTPException(404, "the file is no longer there")
    audited(web, who, "file_downloaded", uid, kind)
    media = "application/json" if kind == "json" else "application/dicom"
    return FileResponse(path, media_type=media, filename=path.name)
