"""
The store contract (L{popd.testing.contract}) run against the SQL store on
SQLite, an embedded database file under each test's directory.
"""

import textwrap
from pathlib import Path

from popd.maildrops.sql import SQLProvider
from popd.testing.contract import MaildropContract

pytest_plugins = ["sqlsupport"]


def sqlite_dsn(directory: Path) -> str:
    return f"sqlite:///{directory / 'popd.sqlite3'}"


class TestSQLiteContract(MaildropContract):
    # read() copies the message in bounded slices in a pool thread, to a
    # temporary file above 1 MiB; the stream reads that copy.
    streams = True

    def make_provider(self, directory: Path) -> SQLProvider:
        self.dsn = sqlite_dsn(directory)
        return SQLProvider.from_dsn(self.dsn)

    def close_provider(self, provider: SQLProvider):
        return provider.close()

    def subprocess_provider_code(self, directory: Path) -> str:
        return textwrap.dedent(
            f"""
            from popd.maildrops.sql import SQLProvider

            def make_provider():
                return SQLProvider.from_dsn({sqlite_dsn(directory)!r})

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
