"""``/v1/models``: base models and this owner's finished fine-tunes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import catalog
from api.deps import OwnerDep, ServicesDep, SessionDep

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(services: ServicesDep, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    data = catalog.list_models(session, services.settings, owner)
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{model_id:path}")
def retrieve_model(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, model_id: str
) -> dict[str, Any]:
    return catalog.get_model(session, services.settings, owner, model_id)


@router.delete("/{model_id:path}")
def delete_model(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, model_id: str
) -> dict[str, Any]:
    with session.begin():
        return catalog.delete_model(session, services.settings, owner, model_id, services.artifacts)
