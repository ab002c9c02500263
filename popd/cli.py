"""
The C{popd} admin command: users, password hashes, local delivery and
configuration checks, against the same defaults as C{twistd popd}.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from twisted.python.failure import Failure

from popd.auth.passwdfile import PasswdFile, set_password
from popd.auth.schemes import DEFAULT_SCHEME, SCHEMES, hash_password
from popd.config import ConfigError, Settings, load_settings
from popd.interfaces import MaildropError, NoSuchUser

# sysexits.h, the exit codes MTAs understand from a delivery command.
EX_USAGE = 64
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


class CommandFailedError(Exception):
    """
    A clear message for the administrator and the exit code to leave with.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _read_password(from_stdin: bool) -> bytes:
    """
    A new password from standard input (first line) or typed twice.
    """
    if from_stdin:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    else:
        first = getpass.getpass("New password: ")
        if first != getpass.getpass("Repeat password: "):
            raise CommandFailedError("the passwords do not match", EX_USAGE)
        password = first.encode("utf-8")
    if not password:
        raise CommandFailedError("the password is empty", EX_USAGE)
    return password


def _settings(arguments: argparse.Namespace) -> Settings:
    try:
        return load_settings(arguments.config, arguments.data_dir)
    except ConfigError as error:
        raise CommandFailedError(str(error), EX_CONFIG) from None


def command_adduser(arguments: argparse.Namespace, *, must_exist: bool = False) -> int:
    settings = _settings(arguments)
    exists = PasswdFile(settings.passwd_file).lookup(arguments.user) is not None
    if must_exist and not exists:
        raise CommandFailedError(
            f"no user {arguments.user} in {settings.passwd_file}", EX_NOUSER
        )
    if not must_exist and exists:
        raise CommandFailedError(
            f"user {arguments.user} already exists; use `popd passwd` to change "
            "the password",
        )
    stored = hash_password(_read_password(arguments.password_stdin), arguments.scheme)
    settings.passwd_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        set_password(settings.passwd_file, arguments.user, stored)
    except ValueError as error:
        raise CommandFailedError(str(error), EX_USAGE) from None
    action = "changed the password of" if must_exist else "added"
    print(f"popd: {action} {arguments.user} in {settings.passwd_file}")
    return 0


def command_passwd(arguments: argparse.Namespace) -> int:
    return command_adduser(arguments, must_exist=True)


def command_hash(arguments: argparse.Namespace) -> int:
    print(hash_password(_read_password(arguments.password_stdin), arguments.scheme))
    return 0


def _wait(deferred_factory):
    """
    Run the reactor until the Deferred that C{deferred_factory} returns has
    fired, and return its result (or raise its failure).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred

    outcome: list = []

    def run() -> None:
        deferred = maybeDeferred(deferred_factory)
        deferred.addBoth(outcome.append)
        deferred.addBoth(lambda _ignored: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def command_deliver(arguments: argparse.Namespace) -> int:
    from popd.delivery import deliver_from_file

    settings = _settings(arguments)
    try:
        uid = _wait(
            lambda: deliver_from_file(
                settings, arguments.user, sys.stdin.buffer, arguments.folder
            )
        )
    except NoSuchUser as error:
        raise CommandFailedError(str(error), EX_NOUSER) from None
    except (MaildropError, OSError) as error:
        # Temporary: the MTA keeps the message queued and tries again.
        raise CommandFailedError(f"delivery failed: {error}", EX_TEMPFAIL) from None
    if arguments.verbose:
        print(f"popd: delivered {uid} to {arguments.user}")
    return 0


def command_check_config(arguments: argparse.Namespace) -> int:
    from popd.service import build_policy, prepare_tls

    settings = _settings(arguments)
    problems = []
    if settings.generated_tls:
        print("popd: TLS uses the self-signed certificate of the data directory")
    else:
        try:
            prepare_tls(settings, build_policy(settings).hostname)
        except ConfigError as error:
            problems.append(str(error))
    if not settings.passwd_file.exists():
        problems.append(f"[auth] passwd_file: {settings.passwd_file} does not exist")
    if problems:
        raise CommandFailedError("\n".join(problems), EX_CONFIG)
    source = settings.config_file or "embedded defaults"
    print(f"popd: configuration OK ({source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popd", description=__doc__.strip())
    parser.add_argument("-c", "--config", help="TOML configuration file")
    parser.add_argument("-d", "--data-dir", help="data directory (default ./popd-data)")
    commands = parser.add_subparsers(dest="command", required=True)

    def password_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
        command.add_argument(
            "--scheme",
            default=DEFAULT_SCHEME,
            type=str.upper,
            choices=SCHEMES,
            help=f"password scheme (default {DEFAULT_SCHEME})",
        )

    adduser = commands.add_parser("adduser", help="add a user to the passwd-file")
    adduser.add_argument("user")
    password_options(adduser)
    adduser.set_defaults(run=command_adduser)

    passwd = commands.add_parser("passwd", help="change a user's password")
    passwd.add_argument("user")
    password_options(passwd)
    passwd.set_defaults(run=command_passwd)

    hash_ = commands.add_parser("hash", help="print a passwd-file password hash")
    password_options(hash_)
    hash_.set_defaults(run=command_hash)

    deliver = commands.add_parser(
        "deliver", help="deliver a message from standard input to a user"
    )
    deliver.add_argument("user")
    deliver.add_argument("--folder", help="Maildir++ folder (default INBOX)")
    deliver.add_argument("-v", "--verbose", action="store_true")
    deliver.set_defaults(run=command_deliver)

    check = commands.add_parser("check-config", help="validate a configuration")
    check.add_argument("file", nargs="?", help="configuration file to check")
    check.set_defaults(run=command_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if getattr(arguments, "file", None):
        arguments.config = arguments.file
    try:
        return arguments.run(arguments)
    except CommandFailedError as error:
        print(f"popd: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
