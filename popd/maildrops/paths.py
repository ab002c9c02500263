"""
Turning user and folder names into filesystem paths, safely.

A user name arrives from the network (or from a passwd-file written by
someone else), so it is never trusted as a path: before it is spliced into a
path template it must be a single, ordinary path component, and the finished
path is checked once more to lie under the template's fixed directory.
"""

from __future__ import annotations

import os
import unicodedata
from functools import lru_cache

#: The longest file name (in UTF-8 octets) common filesystems accept.
MAX_COMPONENT_OCTETS = 255

_PLACEHOLDERS = frozenset("udn%")


class UnsafeNameError(ValueError):
    """
    A user or folder name cannot safely become part of a path.
    """


def check_template(template: str) -> None:
    """
    Check a path template without expanding it, so that configuration
    mistakes show at start-up rather than at the first login.

    @raise ValueError: the template is relative, ends in a lone C{%}, or uses
        a placeholder other than C{%u}, C{%d}, C{%n} and C{%%}.
    """
    _fixed_directory(template)


@lru_cache(maxsize=4096)
def expand_path(template: str, user: str) -> str:
    """
    Expand a maildrop path template for one user.  Remembered for the
    users seen last: every login asks, and the checks cost more than the
    rest of opening an unchanged Maildir.

    C{%u} is the whole user name, C{%d} the domain (after the last C{@},
    empty if there is none), C{%n} the local part (before it) and C{%%} a
    literal C{%}.

    @raise UnsafeNameError: C{user} is not a safe name, or the expansion
        would leave the template's fixed directory.
    @raise ValueError: the template itself is malformed (see
        L{check_template}).
    """
    base = _fixed_directory(template)
    values = _user_values(user)
    expanded = _substitute(template, values)
    normalized = os.path.normpath(expanded)
    if normalized == base or os.path.commonpath([base, normalized]) != base:
        raise UnsafeNameError(f"user name {user!r} leads outside {base}")
    return normalized


def validate_user_name(user: str) -> str:
    """
    Check that a user name can be spliced into a path.

    @return: C{user} unchanged.
    @raise UnsafeNameError: it is empty, too long, not encodable as UTF-8,
        contains C{/} or a control character, or it, its local part or its
        domain is C{.} or C{..} (or empty, when there is an C{@}).
    """
    _user_values(user)
    return user


def validate_folder_name(name: str) -> str:
    """
    Check a Maildir++ folder name such as C{Sent} or C{Lists.python}; its
    directory is the name with a C{.} in front.

    @return: C{name} unchanged.
    @raise UnsafeNameError: it is empty, too long, not encodable as UTF-8,
        contains C{/} or a control character, or has an empty level
        (a leading, trailing or doubled C{.}).
    """
    _check_component(name, "folder name")
    if any(not level for level in name.split(".")):
        raise UnsafeNameError(f"folder name {name!r} has an empty level")
    if len(("." + name).encode("utf-8")) > MAX_COMPONENT_OCTETS:
        raise UnsafeNameError(f"folder name {name!r} is too long")
    return name


def _user_values(user: str) -> dict[str, str]:
    """
    Validate C{user} and return the value of each placeholder.
    """
    _check_component(user, "user name")
    local, at, domain = user.rpartition("@")
    if not at:
        local, domain = user, ""
    elif not local or not domain:
        raise UnsafeNameError(f"user name {user!r} has an empty part around '@'")
    for part in (user, local, domain):
        if part in (".", ".."):
            raise UnsafeNameError(f"user name {user!r} contains {part!r}")
    return {"u": user, "d": domain, "n": local, "%": "%"}


def _check_component(name: str, what: str) -> None:
    """
    Reject what can never be one ordinary path component.
    """
    if not name:
        raise UnsafeNameError(f"{what} is empty")
    if "/" in name:
        raise UnsafeNameError(f"{what} {name!r} contains '/'")
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise UnsafeNameError(f"{what} {name!r} contains a control character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeNameError(f"{what} {name!r} is not valid Unicode") from None
    if len(encoded) > MAX_COMPONENT_OCTETS:
        raise UnsafeNameError(f"{what} {name!r} is too long")


def _fixed_directory(template: str) -> str:
    """
    The directory every expansion of C{template} must stay under: the
    directory part of the literal text before the first user placeholder.
    """
    if not os.path.isabs(template):
        raise ValueError(f"path template {template!r} must be absolute")
    literal = []
    for token in _tokens(template):
        if token in ("%u", "%d", "%n"):
            break
        literal.append("%" if token == "%%" else token)
    return os.path.normpath(os.path.dirname("".join(literal)))


def _substitute(template: str, values: dict[str, str]) -> str:
    """
    Replace each placeholder of C{template} by its value.
    """
    return "".join(
        values[token[1]] if token.startswith("%") else token
        for token in _tokens(template)
    )


def _tokens(template: str) -> list[str]:
    """
    Split C{template} into single literal characters and two-character
    placeholders.

    @raise ValueError: for a lone C{%} or an unknown placeholder.
    """
    tokens = []
    chars = iter(template)
    for char in chars:
        if char == "%":
            key = next(chars, "")
            if not key or key not in _PLACEHOLDERS:
                raise ValueError(
                    f"path template {template!r}: unknown placeholder '%{key}'"
                    " (use %u, %d, %n or %%)"
                )
            char += key
        tokens.append(char)
    return tokens
