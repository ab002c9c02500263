"""
The store contract (L{popd.testing.contract}) run against the mbox store,
with its blocking work in the global reactor's real thread pool.
"""

import os
import textwrap
from pathlib import Path

from popd.maildrops.dotlock import locked_mailbox
from popd.maildrops.mbox import MboxProvider
from popd.maildrops.mboxfile import assign_uids, scan
from popd.testing.contract import MaildropContract


def _templates(directory: Path) -> tuple[str, str]:
    return str(directory / "mail" / "%u"), str(directory / "folders" / "%u")


class TestMboxContract(MaildropContract):
    streams = True

    def make_provider(self, directory: Path) -> MboxProvider:
        inbox, folders = _templates(directory)
        return MboxProvider(inbox, folder_dir_template=folders)

    def subprocess_provider_code(self, directory: Path) -> str:
        inbox, folders = _templates(directory)
        return textwrap.dedent(
            f"""
            from popd.maildrops.mbox import MboxProvider

            def make_provider():
                return MboxProvider({inbox!r}, folder_dir_template={folders!r})
            """
        )

    def vanish(self, provider, avatar_id, uid, folder=None):
        """
        Remove one message the way a mail reader would: under the MTA locks,
        writing a new file and renaming it over the mbox.
        """
        path = provider.mbox_path(avatar_id, folder)
        with locked_mailbox(path) as box:
            size = os.fstat(box.fd).st_size
            messages = scan(box.fd, size)
            uids = assign_uids(messages)
            assert uid in uids, f"no message {uid!r} in {path}"
            kept = b"".join(
                os.pread(box.fd, m.next - m.start, m.start)
                for m, u in zip(messages, uids, strict=True)
                if u != uid
            )
            Path(path + ".mutt").write_bytes(kept)
            os.rename(path + ".mutt", path)
