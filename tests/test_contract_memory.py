"""
The store contract (L{popd.testing.contract}) run against the in-memory
store of L{popd.testing}.
"""

from pathlib import Path

from popd.testing import MemoryMaildropProvider
from popd.testing.contract import MaildropContract


class TestMemoryContract(MaildropContract):
    # read() gives a BytesIO of the stored bytes: nothing to stream from.
    streams = False

    def make_provider(self, directory: Path) -> MemoryMaildropProvider:
        return MemoryMaildropProvider()

    def vanish(self, provider, avatar_id, uid, folder=None):
        provider.remove(avatar_id, uid, folder)
