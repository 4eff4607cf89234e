"""``/v1/models``: base models and this owner's finished fine-tunes."""

from __future__ import annotations

from fastapi import APIRouter

from api import catalog
from api.deps import OwnerDep, ReadSessionDep, ServicesDep, SessionDep
from api.openapi import ERROR_RESPONSES

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("")
def list_models(
    services: ServicesDep, session: ReadSessionDep, owner: OwnerDep
) -> catalog.ModelList:
    data = catalog.list_models(session, services.settings, owner)
    return catalog.ModelList(object="list", data=data, has_more=False)


@router.get("/{model_id:path}")
def retrieve_model(
    services: ServicesDep, session: ReadSessionDep, owner: OwnerDep, model_id: str
) -> catalog.FineTunedModelObject | catalog.ModelObject:
    return catalog.get_model(session, services.settings, owner, model_id)


@router.delete("/{model_id:path}")
def delete_model(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, model_id: str
) -> catalog.ModelDeleted:
    with session.begin():
        return catalog.delete_model(session, services.settings, owner, model_id, services.artifacts)
