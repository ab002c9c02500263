"""
The SQL store: maildrops in SQLite (embedded, the default) or PostgreSQL
(shared by several popd hosts), through DB-API in an C{adbapi} pool.

  - L{SQLProvider}C{.from_dsn(dsn)}: the L{IMaildropProvider}.
  - L{upgrade}C{(dsn)} and L{current_version}C{(dsn)}: blocking schema
    management for C{popd db upgrade}.

Modules: L{store} (the Twisted side: provider, maildrop, pools; read its
docstring for the store's behaviour), L{queries} (the blocking statements
run in pool threads), L{schema} (tables and migrations), L{locks} (the
session lock and its scaling trade-offs), L{dialects} (DSNs and the few
differences between SQLite and PostgreSQL).
"""

from popd.maildrops.sql.dialects import UnsupportedDSN, parse_dsn
from popd.maildrops.sql.schema import (
    LATEST_VERSION,
    MIGRATIONS,
    SchemaError,
    SchemaOutOfDate,
    current_version,
    upgrade,
)
from popd.maildrops.sql.store import SQLMaildrop, SQLProvider

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "SQLMaildrop",
    "SQLProvider",
    "SchemaError",
    "SchemaOutOfDate",
    "UnsupportedDSN",
    "current_version",
    "parse_dsn",
    "upgrade",
]
