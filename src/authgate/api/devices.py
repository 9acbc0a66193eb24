"""Self-service routes for my devices and my second factor (TOTP and recovery codes).

    GET    /devices                          my remembered devices
    DELETE /devices/{device_id}              forget one (its re-authentication token and
                                             sessions end with it)
    DELETE /devices/{device_id}/reauth-token revoke that device's re-authentication token
    DELETE /devices/reauth-tokens            revoke the re-authentication tokens of all my devices
    GET    /mfa                              {totp: {enabled, pending}, recovery_codes_left}
    POST   /mfa/totp                         enrol: {secret, otpauth_uri} (shown once)
    POST   /mfa/totp/confirm {code}          confirm: {recovery_codes} (shown once)
    POST   /mfa/totp/disable {code}          turn TOTP off (a TOTP code or a recovery code)
    POST   /mfa/recovery-codes {code}        replace the recovery codes (a TOTP code)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.deps import get_core, get_principal, get_principal_with_user
from authgate.api.errors import native
from authgate.api.surface import NO_STORE, JSONResponse, client_info, read_body, string_field
from authgate.core.models import Device
from authgate.core.sessions import Principal

router = APIRouter(route_class=native.route_class, tags=["devices and MFA"])


def device_json(device: Device, current: str | None = None) -> dict[str, Any]:
    return {
        "id": device.id, "name": device.name, "device_key_hint": device.device_key[-6:],
        "user_agent": device.user_agent, "created_at": device.created_at.isoformat(),
        "last_seen_at": device.last_seen_at.isoformat(), "current": device.id == current,
    }


@router.get("/devices", summary="My remembered devices")
async def my_devices(request: Request, principal: Principal = Depends(get_principal)) -> Response:
    devices = await get_core(request).devices.list_for_user(principal.realm, principal.user_id)
    return JSONResponse({"devices": [device_json(d, principal.session.device_id)
                                     for d in devices]}, headers=NO_STORE)


@router.delete("/devices/reauth-tokens", summary="Revoke the re-authentication tokens of all "
                                                 "my devices")
async def revoke_all_reauth_tokens(request: Request,
                                   principal: Principal = Depends(get_principal)) -> Response:
    count = await get_core(request).devices.revoke_all_reauth_tokens(
        principal.realm, principal.user_id, client=client_info(request))
    return JSONResponse({"revoked": count}, headers=NO_STORE)


@router.delete("/devices/{device_id}", summary="Forget one of my devices")
async def revoke_device(device_id: str, request: Request,
                        principal: Principal = Depends(get_principal)) -> Response:
    await get_core(request).devices.revoke(principal.realm, device_id,
                                           user_id=principal.user_id,
                                           client=client_info(request))
    return Response(status_code=204)


@router.delete("/devices/{device_id}/reauth-token",
               summary="Revoke one device's re-authentication token")
async def revoke_reauth_token(device_id: str, request: Request,
                              principal: Principal = Depends(get_principal)) -> Response:
    count = await get_core(request).devices.revoke_reauth_token(
        principal.realm, device_id, user_id=principal.user_id, client=client_info(request))
    return JSONResponse({"revoked": count}, headers=NO_STORE)


async def _code(request: Request) -> str:
    body = await read_body(request)
    code = string_field(body, "code", required=True, max_length=64)
    assert code is not None
    return code


@router.get("/mfa", summary="My second factors")
async def mfa_status(request: Request,
                     principal: Principal = Depends(get_principal_with_user)) -> Response:
    core = get_core(request)
    user = principal.user
    status = await core.totp.status(user)
    return JSONResponse({"totp": {"enabled": status.enabled, "pending": status.pending},
                         "recovery_codes_left": status.recovery_codes_left}, headers=NO_STORE)


@router.post("/mfa/totp", summary="Start TOTP enrolment")
async def totp_enrol(request: Request,
                     principal: Principal = Depends(get_principal_with_user)) -> Response:
    core = get_core(request)
    user = principal.user
    enrolment = await core.totp.enrol(principal.realm, user, client=client_info(request))
    return JSONResponse({"secret": enrolment.secret, "otpauth_uri": enrolment.uri},
                        headers=NO_STORE)


@router.post("/mfa/totp/confirm", summary="Confirm TOTP enrolment with a first code")
async def totp_confirm(request: Request,
                       principal: Principal = Depends(get_principal_with_user)) -> Response:
    core = get_core(request)
    code = await _code(request)
    user = principal.user
    codes = await core.totp.confirm(principal.realm, user, code, client=client_info(request))
    return JSONResponse({"enabled": True, "recovery_codes": codes}, headers=NO_STORE)


@router.post("/mfa/totp/disable", summary="Turn TOTP off")
async def totp_disable(request: Request,
                       principal: Principal = Depends(get_principal_with_user)) -> Response:
    core = get_core(request)
    code = await _code(request)
    user = principal.user
    await core.totp.disable(principal.realm, user, code, client=client_info(request))
    return Response(status_code=204)


@router.post("/mfa/recovery-codes", summary="Replace my recovery codes")
async def recovery_codes(request: Request,
                         principal: Principal = Depends(get_principal_with_user)) -> Response:
    core = get_core(request)
    code = await _code(request)
    user = principal.user
    codes = await core.totp.regenerate_recovery_codes(principal.realm, user, code,
                                                      client=client_info(request))
    return JSONResponse({"recovery_codes": codes}, headers=NO_STORE)
