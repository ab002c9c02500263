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
from popd.interfaces import MaildropError, MaildropInUse, NoSuchFolder, NoSuchUser

# sysexits.h, the exit codes MTAs understand from a delivery command.
EX_USAGE = 64
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
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
    """
    Exit 0 only once the message is on stable storage; 67 (EX_NOUSER) for
    an unknown user and 73 (EX_CANTCREAT) for a message over
    C{[delivery] max_message_size}, which the MTA bounces; 75
    (EX_TEMPFAIL) for anything else, even a broken configuration, so that
    the MTA keeps the message and tries again.
    """
    from popd.delivery import MessageTooLarge, deliver_from_file

    try:
        settings = _settings(arguments)
    except CommandFailedError as error:
        raise CommandFailedError(str(error), EX_TEMPFAIL) from None
    try:
        uid = _wait(
            lambda: deliver_from_file(
                settings,
                arguments.user,
                sys.stdin.buffer,
                arguments.folder,
                sender=arguments.sender,
                address=arguments.address,
            )
        )
    except NoSuchUser as error:
        raise CommandFailedError(str(error), EX_NOUSER) from None
    except MessageTooLarge as error:
        raise CommandFailedError(str(error), EX_CANTCREAT) from None
    except Exception as error:
        # Temporary: the MTA keeps the message queued and tries again.
        raise CommandFailedError(f"delivery failed: {error}", EX_TEMPFAIL) from None
    if arguments.verbose:
        print(f"popd: delivered {uid} to {arguments.user}")
    return 0


def command_check_config(arguments: argparse.Namespace) -> int:
    from popd.auth.factories import build_checkers
    from popd.service import build_policy, build_provider, prepare_tls

    settings = _settings(arguments)
    problems = []
    # Findings are printed only when all is well: a failure is one line each.
    findings = []
    if settings.generated_tls:
        findings.append("TLS uses the self-signed certificate of the data directory")
    else:
        try:
            prepare_tls(settings, build_policy(settings).hostname)
        except ConfigError as error:
            problems.append(str(error))
    try:
        build_checkers(settings.checkers, settings.sql_dsn, settings.sql_query)
    except ValueError as error:
        problems.append(f"[auth] checkers: {error}")
    if not settings.passwd_file.exists() and any(
        checker.startswith("passwd-file:") for checker in settings.checkers
    ):
        problems.append(f"[auth] passwd_file: {settings.passwd_file} does not exist")
    try:
        findings.append(_describe_store(settings, build_provider(settings)))
    except ConfigError as error:
        problems.append(str(error))
    if problems:
        raise CommandFailedError("\n".join(problems), EX_CONFIG)
    for finding in findings:
        print(f"popd: {finding}")
    source = settings.config_file or "embedded defaults"
    print(f"popd: configuration OK ({source})")
    return 0


def _describe_store(settings: Settings, provider) -> str:
    """
    What the configured store holds, found by asking it: a Maildir or mbox
    path template, or an SQL database's schema version.
    """
    if settings.maildrop_type == "sql":
        from popd.maildrops.sql import LATEST_VERSION, current_version

        try:
            version = current_version(settings.dsn)
        except Exception as error:  # any driver error is a finding
            raise ConfigError(
                f"[maildrop] dsn: cannot use the database: {error}"
            ) from None
        if version < LATEST_VERSION:
            raise ConfigError(
                f"[maildrop] dsn: schema version {version}, this popd needs "
                f"{LATEST_VERSION}: run `popd db upgrade`"
            )
        return f"SQL store at schema version {version}"
    return f"{settings.maildrop_type} store at {settings.maildrop_path}"


def _run_with_store(settings: Settings, other_spec: str | None, work):
    """
    Run C{work(configured, other)} (a coroutine function) on the reactor
    with the configured store and, if named, a second one; close SQL
    stores' connection pools afterwards.
    """
    from twisted.internet.defer import Deferred

    from popd.service import build_provider
    from popd.transfer import provider_from_spec

    try:
        configured = build_provider(settings)
        other = provider_from_spec(other_spec) if other_spec else None
    except (ConfigError, ValueError) as error:
        raise CommandFailedError(str(error), EX_USAGE) from None

    async def run():
        try:
            return await work(configured, other)
        finally:
            for provider in (configured, other):
                close = getattr(provider, "close", None)
                if close is not None:
                    await close()

    return _wait(lambda: Deferred.fromCoroutine(run()))


def _store_failure(error: Exception) -> CommandFailedError:
    if isinstance(error, MaildropInUse):
        return CommandFailedError(
            "the maildrop is in use by a POP3 session", EX_TEMPFAIL
        )
    if isinstance(error, NoSuchUser | NoSuchFolder):
        return CommandFailedError(str(error), EX_NOUSER)
    return CommandFailedError(f"store error: {error}", EX_TEMPFAIL)


def command_copy(arguments: argparse.Namespace) -> int:
    """
    C{popd import USER --from SPEC} and C{popd export USER --to SPEC}: copy
    one maildrop between the configured store and another, keeping UIDs.
    """
    from popd.transfer import copy_mailbox, progress_bar

    settings = _settings(arguments)
    importing = arguments.command == "import"
    spec = arguments.source if importing else arguments.target
    other_user = arguments.other_user or arguments.user

    async def work(configured, other):
        source, target = (other, configured) if importing else (configured, other)
        source_user, target_user = (
            (other_user, arguments.user) if importing else (arguments.user, other_user)
        )
        return await copy_mailbox(
            source,
            source_user,
            target,
            target_user,
            arguments.folder,
            progress=None if arguments.quiet else progress_bar(sys.stderr),
        )

    try:
        report = _run_with_store(settings, spec, work)
    except (MaildropError, OSError) as error:
        raise _store_failure(error) from None
    print(
        f"popd: copied {report.copied} messages ({report.octets} octets), "
        f"skipped {report.skipped} already there"
    )
    return 0


def command_expire(arguments: argparse.Namespace) -> int:
    """
    C{popd expire USER...}: apply the retention policy (days after first
    retrieval) without waiting for the users' next sessions.
    """
    from popd.transfer import expire_mailbox

    settings = _settings(arguments)
    days = arguments.days
    if days is None:
        if settings.expire is None or not settings.expire.isdigit():
            raise CommandFailedError(
                "no retention policy: give --days or set [pop3] expire to days",
                EX_USAGE,
            )
        days = int(settings.expire)
    failures = 0

    async def work(configured, _other):
        nonlocal failures
        for user in arguments.users:
            try:
                removed = await expire_mailbox(configured, user, days, arguments.folder)
            except (MaildropError, OSError) as error:
                failures += 1
                print(f"popd: {user}: {_store_failure(error)}", file=sys.stderr)
            else:
                print(f"popd: {user}: removed {removed} expired messages")

    _run_with_store(settings, None, work)
    return EX_TEMPFAIL if failures else 0


def command_db(arguments: argparse.Namespace) -> int:
    """
    C{popd db upgrade} applies the SQL store's migrations; C{popd db status}
    says whether any are pending.
    """
    from popd.maildrops.sql import LATEST_VERSION, current_version, upgrade

    settings = _settings(arguments)
    if settings.maildrop_type != "sql":
        raise CommandFailedError(
            f'[maildrop] type is "{settings.maildrop_type}": only the SQL store '
            "has a schema",
            EX_CONFIG,
        )
    try:
        if arguments.action == "upgrade":
            applied = upgrade(settings.dsn)
            for name in applied:
                print(f"popd: applied migration {name}")
            print(f"popd: schema is at version {current_version(settings.dsn)}")
            return 0
        version = current_version(settings.dsn)
    except Exception as error:  # report any driver error plainly
        raise CommandFailedError(f"database: {error}", EX_TEMPFAIL) from None
    print(f"popd: schema version {version} of {LATEST_VERSION}")
    return 0 if version == LATEST_VERSION else 1


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
    deliver.add_argument(
        "-f",
        "--sender",
        help="envelope sender, as the MTA passes it (adds Return-Path and "
        "Delivered-To; empty for <>)",
    )
    deliver.add_argument(
        "-a",
        "--address",
        help="recipient address for Delivered-To (default USER)",
    )
    deliver.add_argument("-v", "--verbose", action="store_true")
    deliver.set_defaults(run=command_deliver)

    for name, direction, help_text in (
        ("import", "--from", "copy a user's mail from another store into this one"),
        ("export", "--to", "copy a user's mail from this store into another"),
    ):
        copy = commands.add_parser(name, help=help_text)
        copy.add_argument("user", help="the user in the configured store")
        copy.add_argument(
            direction,
            dest="source" if name == "import" else "target",
            required=True,
            metavar="STORE",
            help="maildir:PATH, mbox:PATH or sql:DSN (PATH may contain %%u)",
        )
        copy.add_argument(
            "--other-user", help="the user's name in the other store (default USER)"
        )
        copy.add_argument("--folder", help="copy this folder (default INBOX)")
        copy.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        copy.set_defaults(run=command_copy)

    expire = commands.add_parser("expire", help="remove mail retrieved N days ago")
    expire.add_argument("users", nargs="+", metavar="USER")
    expire.add_argument("--days", type=int, help="default: [pop3] expire")
    expire.add_argument("--folder", help="this folder (default INBOX)")
    expire.set_defaults(run=command_expire)

    db = commands.add_parser("db", help="the SQL store's schema")
    db.add_argument("action", choices=("upgrade", "status"))
    db.set_defaults(run=command_db)

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
