"""
The store contract (L{popd.testing.contract}) run against the Maildir store,
with its blocking work in the global reactor's real thread pool.
"""

import textwrap
from pathlib import Path

from popd.maildrops.maildir import MaildirProvider
from popd.testing.contract import MaildropContract


class TestMaildirContract(MaildropContract):
    streams = True

    def make_provider(self, directory: Path) -> MaildirProvider:
        self.directory = directory
        return MaildirProvider(str(directory / "%u" / "Maildir"))

    def subprocess_provider_code(self, directory: Path) -> str:
        template = str(directory / "%u" / "Maildir")
        return textwrap.dedent(
            f"""
            from popd.maildrops.maildir import MaildirProvider

            def make_provider():
                return MaildirProvider({template!r})
            """
        )

    def vanish(self, provider, avatar_id, uid, folder=None):
        root = self.directory / avatar_id / "Maildir"
        if folder is not None:
            root = root / f".{folder}"
        for sub in ("new", "cur"):
            for path in (root / sub).iterdir():
                if path.name.partition(":")[0] == uid:
                    path.unlink()
                    return
        raise AssertionError(f"no file for {uid!r}")
