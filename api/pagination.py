"""Cursor pages in OpenAI's shape: ``{object: "list", data, has_more}``, ``after`` = last id."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.errors import invalid

Item = TypeVar("Item", bound=BaseModel)

MAX_LIMIT = 10_000
# The bound parameter of the limit in statements built once (see page()).
PAGE_LIMIT = "page_limit"


class ListPage(BaseModel, Generic[Item]):
    """One page of a list, newest first (files may ask for oldest first)."""

    object: Literal["list"] = Field(description="Always 'list'.")
    data: list[Item] = Field(description="The items of this page, in the list's order.")
    has_more: bool = Field(
        description="Whether more items follow; ask again with after=last_id to get them."
    )
    first_id: str | None = Field(description="The id of the first item; null on an empty page.")
    last_id: str | None = Field(
        description="The id of the last item (the next page's 'after'); null on an empty page."
    )


Page = TypeVar("Page", bound=ListPage[Any])


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid(f"limit must be between 1 and {MAX_LIMIT}.", param="limit")
    return limit


def page(
    session: Session,
    query: Select[*tuple[Any, ...]],
    limit: int,
    render: Callable[..., Any],
    page_type: type[Page],
    params: Mapping[str, Any] | None = None,
) -> Page:
    """Run ``query`` (already filtered by the cursor and ordered) for one page.

    Each row's first column is the listed object's own row, so its ``id`` is the public id;
    ``render`` takes a row's columns as its arguments (the job list selects each job's queue
    place beside it).

    ``params``: the bound parameters of a statement built once, at import, with
    ``.limit(bindparam(PAGE_LIMIT))`` (the pages read most often, api/job_queries.py):
    SQLAlchemy then reuses its cache key, where building a statement and its key cost more
    than running it. Without them, ``query`` was built for this request and the limit is
    added here.
    """
    fetch = check_limit(limit) + 1
    if params is None:
        rows: Sequence[Any] = session.execute(query.limit(fetch)).all()
    else:
        rows = session.execute(query, {**params, PAGE_LIMIT: fetch}).all()
    shown = rows[:limit]
    return page_type(
        object="list",
        data=[render(*row) for row in shown],
        has_more=len(rows) > limit,
        first_id=shown[0][0].id if shown else None,
        last_id=shown[-1][0].id if shown else None,
    )
