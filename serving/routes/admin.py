"""``POST /admin/reload``: hot reload of a model directory (needs ``CTCVR_ADMIN_TOKEN``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status

from schemas.api import ErrorResponse, ReloadRequest, ReloadResponse
from serving.artifact import ArtifactError
from serving.deps import RegistryDep, SettingsDep, require_admin_token
from serving.registry import ReloadInProgress

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_token)])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Load a model directory and serve it",
    responses={
        400: {"model": ErrorResponse, "description": "A body that is not JSON"},
        401: {"model": ErrorResponse, "description": "Missing or invalid admin token"},
        403: {
            "model": ErrorResponse,
            "description": "Admin endpoints are disabled (CTCVR_ADMIN_TOKEN unset)",
        },
        409: {
            "model": ErrorResponse,
            "description": "Another reload is in progress, the service runs several workers, "
            "or it follows a model repository (its pointer decides what is served)",
        },
        422: {
            "model": ErrorResponse,
            "description": "The artifact cannot be served (the previous model keeps serving), or an invalid body",
        },
    },
)
def reload(
    registry: RegistryDep,
    settings: SettingsDep,
    request: Request,
    body: ReloadRequest | None = None,
) -> ReloadResponse:
    """Loads ``model_dir`` (default: the served model's directory, e.g. re-exported in place;
    a path or a URI such as ``s3://bucket/models/x``, fetched and verified first), checks it,
    and swaps it in; requests in flight finish on the model they started with. A failed reload
    changes nothing and says why. A service of several worker processes refuses it (409): a
    request reaches one worker, and the others would go on serving the old model.
    """
    if settings.workers > 1:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"this service runs {settings.workers} worker processes and a reload would reach "
            "only one of them: send SIGHUP to the main process of python -m serving to restart "
            "every worker on CTCVR_MODEL_DIR, one at a time, or roll out a new CTCVR_MODEL_DIR",
        )
    model_dir = body.model_dir if body is not None and body.model_dir else None
    follower = request.app.state.follower
    if model_dir is not None and follower is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"this service follows model repository {follower.repository.uri}: change what it "
            "serves with python -m trainer.models promote or rollback",
        )
    previous = registry.current.version if registry.current is not None else None
    try:
        result = registry.reload(model_dir)
    except ReloadInProgress as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    except ArtifactError as err:
        raise HTTPException(422, f"reload failed, still serving {previous}: {err}") from None
    request.app.openapi_schema = None  # the request schema follows the model's feature schema
    return result
