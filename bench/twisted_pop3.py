"""
The smallest POP3 server a Twisted user writes today: C{twisted.mail.pop3}
over C{twisted.mail.maildir.MaildirMailbox}, users from a passwd-file's
C{{PLAIN}} passwords in an in-memory checker, TCP_NODELAY on (without it a
lock-step client waits on delayed ACKs: about 14 sessions/s), and
implicit TLS on a second port.  Messages are opened in binary mode
(C{MaildirMailbox.getMessage} opens them as text, which breaks RETR on
Python 3).

    python bench/twisted_pop3.py --port 11110 --tls-port 11995 \\
        --passwd PASSWD --mail-root ROOT --cert CERT --key KEY
"""

import argparse
import sys

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import endpoints, protocol, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.mail import pop3
from twisted.mail.maildir import MaildirMailbox
from zope.interface import implementer


class BinaryMaildirMailbox(MaildirMailbox):
    # MaildirMailbox opens messages in text mode, which breaks RETR on
    # Python 3 (transformChunk gets str): the one fix this server needs.
    def getMessage(self, i):
        return open(self.list[i], "rb")


@implementer(IRealm)
class MaildirRealm:
    def __init__(self, mail_root: str) -> None:
        self.mail_root = mail_root

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError()
        user = avatarId.decode()
        mailbox = BinaryMaildirMailbox(f"{self.mail_root}/{user}/Maildir".encode())
        return pop3.IMailbox, mailbox, lambda: None


class NoDelayPOP3(pop3.POP3):
    timeOut = 3600

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class POP3Factory(protocol.ServerFactory):
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr):
        server = NoDelayPOP3()
        server.factory = self
        server.portal = self.portal
        return server


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--passwd", "--mail-root", "--cert", "--key"):
        parser.add_argument(option, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    options = parser.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    with open(options.passwd) as passwd:
        for line in passwd:
            user, secret = line.split(":")[:2]
            checker.addUser(user.encode(), secret.removeprefix("{PLAIN}").encode())
    factory = POP3Factory(Portal(MaildirRealm(options.mail_root), [checker]))
    endpoints.serverFromString(
        reactor, f"tcp:{options.port}:interface=127.0.0.1"
    ).listen(factory)
    endpoints.serverFromString(
        reactor,
        f"ssl:{options.tls_port}:interface=127.0.0.1:"
        f"privateKey={options.key}:certKey={options.cert}",
    ).listen(factory)
    reactor.run()


if __name__ == "__main__":
    main()
