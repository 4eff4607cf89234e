"""Cursor pages in OpenAI's shape: ``{object: "list", data, has_more}``, ``after`` = last id."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.errors import invalid

Row = TypeVar("Row")

MAX_LIMIT = 10_000


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid(f"limit must be between 1 and {MAX_LIMIT}.", param="limit")
    return limit


def page(
    session: Session,
    query: Select[Any],
    limit: int,
    render: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``query`` (already filtered by the cursor and ordered) for one page."""
    rows: Sequence[Any] = session.scalars(query.limit(check_limit(limit) + 1)).all()
    data = [render(row) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
