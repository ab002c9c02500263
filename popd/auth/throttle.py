"""
Slowing down password guessing, and POP3's LOGIN-DELAY.

Every failed login is answered only after a delay, never by blocking: the
session schedules its reply on the reactor (C{deferLater}) and every other
client goes on being served meanwhile.  The delay is the larger of

  - the configured C{failure_delay} (Dovecot's C{auth_failure_delay},
    2 seconds by default), applied to every failed login alike, and
  - a penalty that grows with the recent failures of the client's address
    and, separately, of the user name tried: the first L{FREE_FAILURES} (3)
    cost nothing extra, then the penalty starts at L{PENALTY_START} (4 s)
    and doubles with each further failure up to L{MAX_DELAY} (15 s).  With
    the default delay a run of failures is answered after
    2, 2, 2, 4, 8, 15, 15, ... seconds.

A key's failure count drops by one for every L{QUIET_PERIOD} (300 s) in
which it has no failure, so the penalty halves with each quiet five
minutes and a key at the cap is forgotten after half an hour of quiet.
The count never grows past the level at which the penalty reaches the cap,
so a long attack costs no longer to recover from than a short one.

Keys: the client's address (an IPv6 address by its /64 network, which is
what one machine usually has; IPv4-mapped addresses as IPv4), and the user
name tried, letter case ignored.  Neither a successful login nor a trusted
network clears or skips the penalty: a trusted address can be a
compromised host too, and an attacker who owns one account must not be able
to reset the counts of its address by logging in to it.  A correct
password is never delayed, so the penalty only ever slows the guesser, not
the user whose name is being guessed.

The counts live in this process's memory, bounded to L{MAX_KEYS} keys of
each kind (the least recently failing go first), and are lost at a restart;
several worker processes count separately.  That bounds a sequential
guesser; a guesser with many parallel connections is bounded by
C{max_auth_failures} per connection and is for a firewall or fail2ban to
stop, from the C{login failed} log lines.

LOGIN-DELAY (RFC 2449 section 6.5): when configured, a user who logged in
less than that many seconds ago is refused with C{-ERR [LOGIN-DELAY]} after
giving the correct password.  The time of each user's last login is kept in
this process's memory too (L{MAX_KEYS} users), so with several worker
processes or after a restart a client can get in sooner.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from ipaddress import IPv6Address, ip_address, ip_network

__all__ = [
    "FREE_FAILURES",
    "MAX_DELAY",
    "MAX_KEYS",
    "PENALTY_START",
    "QUIET_PERIOD",
    "LoginThrottle",
    "address_key",
    "user_key",
]

#: Failures of one key that cost no more than the plain failure delay.
FREE_FAILURES = 3
#: The penalty of the first failure past L{FREE_FAILURES}, in seconds.
PENALTY_START = 4.0
#: The longest a failed login is ever delayed, in seconds.
MAX_DELAY = 15.0
#: Seconds without a failure after which a key's count drops by one.
QUIET_PERIOD = 300.0
#: Keys of each kind (addresses, user names, last logins) kept at most.
MAX_KEYS = 100_000

# Longest user name kept as a key: POP3 command lines are shorter anyway.
_MAX_USER_KEY = 256


@lru_cache(maxsize=16384)
def address_key(host: str | None) -> str | None:
    """
    The key a client address is counted under: IPv4 as it is, IPv6 by its
    /64 network, anything that is not an IP address (a UNIX socket) not
    at all (C{None}).  Remembered for recent addresses: every connection
    asks, and parsing an address costs more than the rest of counting it.
    """
    if host is None:
        return None
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ip_network(f"{address}/64", strict=False))
    return str(address)


def user_key(name: bytes | str | None) -> str | None:
    """
    The key a user name is counted under: decoded, case-folded, bounded.
    """
    if name is None:
        return None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.casefold()[:_MAX_USER_KEY] or None


class _Counts:
    """
    Failure counts that decay, for one kind of key.
    """

    def __init__(self, quiet_period: float, ceiling: int, max_keys: int) -> None:
        self._quiet = quiet_period
        self._ceiling = ceiling
        self._max_keys = max_keys
        # key -> (count, time of the last failure, or of the last decay step)
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def current(self, key: str | None, now: float) -> int:
        """
        The count of C{key} at C{now}, after decay.
        """
        if key is None:
            return 0
        entry = self._entries.get(key)
        if entry is None:
            return 0
        count, since = self._decayed(entry, now)
        if count == 0:
            del self._entries[key]
        return count

    def add(self, key: str | None, now: float) -> int:
        """
        Count one more failure of C{key} at C{now}; the new count.
        """
        if key is None:
            return 0
        entry = self._entries.pop(key, None)
        count = self._decayed(entry, now)[0] if entry is not None else 0
        count = min(count + 1, self._ceiling)
        self._entries[key] = (count, now)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
        return count

    def _decayed(self, entry: tuple[int, float], now: float) -> tuple[int, float]:
        count, since = entry
        if now <= since or self._quiet <= 0:
            return entry if self._quiet > 0 else (0, now)
        steps = int((now - since) // self._quiet)
        if steps == 0:
            return entry
        return max(0, count - steps), since + steps * self._quiet


class LoginThrottle:
    """
    The failure counts and last-login times one server process shares
    between all its sessions (see the module documentation for the rules).

    Every method takes the current time from the caller, who reads it from
    its reactor, so tests can use a L{twisted.internet.task.Clock}.
    """

    def __init__(
        self,
        *,
        free_failures: int = FREE_FAILURES,
        penalty_start: float = PENALTY_START,
        max_delay: float = MAX_DELAY,
        quiet_period: float = QUIET_PERIOD,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.free_failures = free_failures
        self.penalty_start = penalty_start
        self.max_delay = max_delay
        ceiling = free_failures + 1
        while self._penalty(ceiling) < max_delay and ceiling < free_failures + 64:
            ceiling += 1
        self._addresses = _Counts(quiet_period, ceiling, max_keys)
        self._users = _Counts(quiet_period, ceiling, max_keys)
        self._logins: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys

    def _penalty(self, count: int) -> float:
        if count <= self.free_failures:
            return 0.0
        excess = count - self.free_failures - 1
        return min(self.max_delay, self.penalty_start * 2.0**excess)

    def _delay(self, base: float, address_count: int, user_count: int) -> float:
        penalty = self._penalty(max(address_count, user_count))
        return max(base, min(self.max_delay, penalty))

    def failed(
        self, base: float, host: str | None, user: bytes | str | None, now: float
    ) -> float:
        """
        Count a failed login (a wrong password or an unknown user) from
        C{host} for C{user} and return how long to wait before replying.

        @param base: the configured failure delay, the least wait.
        """
        return self._delay(
            base,
            self._addresses.add(address_key(host), now),
            self._users.add(user_key(user), now),
        )

    def delay(
        self, base: float, host: str | None, user: bytes | str | None, now: float
    ) -> float:
        """
        How long to wait before a refusal that is not a failed password
        (maildrop in use, LOGIN-DELAY, a store error), counting nothing.
        """
        return self._delay(
            base,
            self._addresses.current(address_key(host), now),
            self._users.current(user_key(user), now),
        )

    def logged_in(self, user: bytes | str, now: float) -> None:
        """
        Remember that C{user} logged in at C{now}, for LOGIN-DELAY.
        """
        key = user_key(user)
        if key is None:
            return
        self._logins.pop(key, None)
        self._logins[key] = now
        while len(self._logins) > self._max_keys:
            self._logins.popitem(last=False)

    def login_wait(self, user: bytes | str, now: float, login_delay: float) -> float:
        """
        Seconds C{user} must still wait before logging in again under a
        LOGIN-DELAY of C{login_delay} seconds; 0 when they may.
        """
        key = user_key(user)
        last = self._logins.get(key) if key is not None else None
        if last is None:
            return 0.0
        remaining = last + login_delay - now
        if remaining <= 0:
            del self._logins[key]
            return 0.0
        return remaining
