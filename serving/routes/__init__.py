"""The service's routers, one file per resource."""

from serving.routes import admin, health, model, rank, score

__all__ = ["admin", "health", "model", "rank", "score"]
