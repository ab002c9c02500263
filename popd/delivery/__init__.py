"""
Mail arriving from the MTA: the C{deliver} pipe command, later LMTP/SMTP.
"""

from popd.delivery.pipe import deliver_from_file

__all__ = ["deliver_from_file"]
