"""Named dependencies, so that route signatures read as domain words.

They are ``async def`` because none of them blocks: FastAPI runs plain ``def`` dependencies in
its thread pool, one thread hop each, which would cost more than the scoring of a small request.
(For the same reason the app itself sets no ``dependency_overrides``: with any override present,
FastAPI re-inspects every dependency's signature on every request.)
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr

from serving.batching import MicroBatcher
from serving.config import ServingSettings
from serving.metrics import ServiceMetrics
from serving.registry import ModelRegistry
from serving.scorer import Scorer

__all__ = [
    "BEARER_SECURITY",
    "MetricsDep",
    "RegistryDep",
    "ScorerDep",
    "Scoring",
    "ScoringDep",
    "SettingsDep",
    "current_settings",
    "read_scoring",
    "require_admin_token",
    "require_api_token",
]


async def current_settings(request: Request) -> ServingSettings:
    """The app's settings: ``create_app(settings)``, by default :func:`get_settings` (the
    environment). Tests pass their own to ``create_app`` or override this dependency."""
    return request.app.state.settings


SettingsDep = Annotated[ServingSettings, Depends(current_settings)]


async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]


async def _scorer(registry: RegistryDep) -> Scorer:
    scorer = registry.current  # taken once: a reload during this request does not change it
    if scorer is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model is loaded")
    return scorer


ScorerDep = Annotated[Scorer, Depends(_scorer)]


@dataclass(frozen=True)
class Scoring:
    """A score request: its raw body and what it works with: the model (taken once, so a
    reload during the request does not change it), the micro-batcher and the settings."""

    body: bytes
    scorer: Scorer
    batcher: MicroBatcher
    settings: ServingSettings


async def read_scoring(request: Request) -> Scoring:
    """The score routes' only dependency (``ScoringDep``): it checks the token, the media type
    and the model in one call, and reads the body.

    One call rather than five (token, settings, bearer credentials, body, model), which FastAPI
    solved on every request: about 35 us of a 1-row request. The score routes' class
    (``serving.routes._scoring.ScoringRoute``) calls it directly.

    Raises:
        HTTPException: 401 without the API token, 415 for a body that is not JSON, 503 when no
            model is loaded.
    """
    state = request.app.state
    settings: ServingSettings = state.settings
    if settings.api_token is not None:
        _check(settings.api_token, _bearer_credentials(request))
    body = await _json_body(request)
    scorer = state.registry.current
    if scorer is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model is loaded")
    return Scoring(body, scorer, state.batcher, settings)


ScoringDep = Annotated[Scoring, Depends(read_scoring)]

# What the score routes declare in the OpenAPI document in place of a ``Credentials``
# dependency (``read_scoring`` reads the header itself): the scheme of ``_bearer`` below.
BEARER_SECURITY = {"security": [{"HTTPBearer": []}]}


async def _json_body(request: Request) -> bytes:
    """The raw body (parsed later, in one pass, by the model's request schema)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"send JSON (Content-Type: application/json), not {media!r}",
            )
    return await request.body()


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _bearer_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    """What ``_bearer`` gives a route: the token of ``Authorization: Bearer <token>``, or None."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() != "bearer" or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


def _check(expected: SecretStr, credentials: HTTPAuthorizationCredentials | None) -> None:
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_token(settings: SettingsDep, credentials: Credentials) -> None:
    """Checks ``Authorization: Bearer`` against ``CTCVR_API_TOKEN`` when one is configured."""
    if settings.api_token is not None:
        _check(settings.api_token, credentials)


async def require_admin_token(settings: SettingsDep, credentials: Credentials) -> None:
    """Admin endpoints need ``CTCVR_ADMIN_TOKEN``; without one configured they are disabled."""
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "admin endpoints are disabled: set CTCVR_ADMIN_TOKEN"
        )
    _check(settings.admin_token, credentials)
