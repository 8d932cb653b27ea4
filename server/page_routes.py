"""The search page at `/`: static files shipped in the package (the machine may be offline, so no
CDN), talking to the same public API as any client. The page holds no data, so it needs no key;
what it shows comes through the API, with the key the user types."""
from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from umr.server.errors import ApiError

PAGE = Path(__file__).resolve().parent / "page"
FILES = {"index.html": "text/html; charset=utf-8", "search.js": "text/javascript; charset=utf-8",
         "search.css": "text/css; charset=utf-8"}
# Only the page's own files run; thumbnails arrive as blob: URLs, pasted images as data: URLs.
POLICY = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

router = APIRouter(include_in_schema=False)


@cache
def content(name: str) -> bytes:
    return (PAGE / name).read_bytes()


def page_file(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, "not_found", f"no page file {name!r}")
    return Response(content(name), media_type=FILES[name],
                    headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


@router.get("/")
async def search_page():
    return page_file("index.html")


@router.get("/page/{name}")
async def page_asset(name: str):
    return page_file(name)
