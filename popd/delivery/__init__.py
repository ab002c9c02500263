"""
Mail arriving from the MTA: the LMTP and SMTP listeners (L{server}) and
the C{deliver} pipe command (L{pipe}), sharing the recipient rules
(L{recipients}), the spool (L{spool}) and the trace fields (L{headers}).
"""

from popd.delivery.agent import LocalDelivery, local_delivery
from popd.delivery.pipe import deliver_from_file
from popd.delivery.spool import MessageTooLarge

__all__ = ["LocalDelivery", "MessageTooLarge", "deliver_from_file", "local_delivery"]
