"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authgate.api.errors import native
from authgate.api.surface import JSONResponse

router = APIRouter(route_class=native.route_class, tags=["operations"])

_OK = b'{"status":"ok"}'


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return Response(_OK, media_type="application/json")


@router.get("/readyz", summary="Readiness: the database answers")
async def readyz(request: Request) -> Response:
    try:
        await request.app.state.core.store.ping()
    except Exception:  # noqa: BLE001 - any failure means not ready; the cause is logged
        request.app.state.log.warning("readiness check failed", exc_info=True)
        return JSONResponse({"status": "unavailable", "database": "unreachable"},
                            status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
