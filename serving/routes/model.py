"""``GET /v1/model``: what is being served."""

from __future__ import annotations

from fastapi import APIRouter, Request

from schemas.api import ErrorResponse, ModelInfo
from schemas.artifact import Int8Layout, Quantization
from serving.deps import RegistryDep, ScorerDep
from serving.tables import int8_kernel_built

__all__ = ["router"]

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="The model being served",
    responses={
        401: {
            "model": ErrorResponse,
            "description": "Missing or invalid bearer token (CTCVR_API_TOKEN)",
        },
        503: {"model": ErrorResponse, "description": "No model loaded"},
    },
)
async def model_info(scorer: ScorerDep, registry: RegistryDep, request: Request) -> ModelInfo:
    """Version, provenance, evaluation metrics and the features a request row may hold; when
    following a model repository, its current version too."""
    manifest = scorer.artifact.manifest
    follower = request.app.state.follower
    int8_layout = (
        manifest.embeddings.int8_rows if manifest.quantization is Quantization.INT8 else None
    )
    return ModelInfo(
        version=manifest.version,
        created_at=manifest.created_at,
        loaded_at=scorer.loaded_at,
        model_dir=scorer.model_dir,
        schema_name=scorer.artifact.schema.name,
        schema_fingerprint=manifest.schema_fingerprint,
        heads=list(manifest.model.heads),
        quantization=manifest.quantization,
        int8_layout=int8_layout,
        int8_kernel=int8_kernel_built() if int8_layout is Int8Layout.SCALE_INDEX else None,
        source=manifest.source.model_dump(mode="json"),
        metrics=manifest.metrics,
        features=scorer.features_info(),
        max_rows=scorer.max_rows,
        last_reload_error=registry.last_reload_error,
        repository=follower.status() if follower is not None else None,
    )
