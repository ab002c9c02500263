"""
The store contract (L{popd.testing.contract}) run against the SQL store on
PostgreSQL: each test gets an empty, upgraded schema of its own in this
run's database (see C{tests/sqlsupport.py}); skipped, saying why, without a
reachable server.
"""

import textwrap
from pathlib import Path

import pytest

from popd.maildrops.sql import SQLProvider, upgrade
from popd.testing.contract import MaildropContract

pytest_plugins = ["sqlsupport"]


class TestPostgreSQLContract(MaildropContract):
    # read() copies the message in bounded slices in a pool thread, to a
    # temporary file above 1 MiB; the stream reads that copy.
    streams = True

    @pytest.fixture(autouse=True)
    def _database(self, postgresql_dsn: str) -> None:
        upgrade(postgresql_dsn)
        self.dsn = postgresql_dsn

    def make_provider(self, directory: Path) -> SQLProvider:
        return SQLProvider.from_dsn(self.dsn)

    def close_provider(self, provider: SQLProvider):
        return provider.close()

    def subprocess_provider_code(self, directory: Path) -> str:
        return textwrap.dedent(
            f"""
            from popd.maildrops.sql import SQLProvider

            def make_provider():
                return SQLProvider.from_dsn({self.dsn!r})

            def close_provider(provider):
                return provider.close()
            """
        )

    def vanish(self, provider, avatar_id, uid, folder=None):
        from sqlsupport import query

        query(
            self.dsn,
            "DELETE FROM popd_messages WHERE user_name = ? AND folder = ? AND uid = ?",
            avatar_id,
            folder or "",
            uid,
        )
