"""A direct connection to the running system's database, for what the API does not show."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from tests.support.system import System


def connect(system: System) -> psycopg.Connection[dict[str, Any]]:
    """An autocommit connection whose rows are dicts by column name."""
    url = make_url(system.db_url).set(drivername="postgresql")
    return psycopg.connect(
        url.render_as_string(hide_password=False), autocommit=True, row_factory=dict_row
    )
