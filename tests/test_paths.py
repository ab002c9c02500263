"""
Tests for L{popd.maildrops.paths}: user and folder names never escape.
"""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popd.maildrops.paths import (
    UnsafeNameError,
    check_template,
    expand_path,
    validate_folder_name,
    validate_user_name,
)

TEMPLATE = "/var/vmail/%d/%n/Maildir"


@pytest.mark.parametrize(
    ("template", "user", "expected"),
    [
        (
            "/var/vmail/%d/%n/Maildir",
            "bob@example.com",
            "/var/vmail/example.com/bob/Maildir",
        ),
        ("/home/%u/Maildir", "bob", "/home/bob/Maildir"),
        ("/srv/%u", "bob@example.com", "/srv/bob@example.com"),
        ("/srv/%d/%n", "bob", "/srv/bob"),
        ("/srv/a@b@c/%n", "x@y@z", "/srv/a@b@c/x@y"),
        ("/srv/100%%/%u", "bob", "/srv/100%/bob"),
        ("/srv/u-%u", "bob", "/srv/u-bob"),
        ("/home/%u/Maildir", "jürgen", "/home/jürgen/Maildir"),
        ("/home/%u/Maildir", "...", "/home/.../Maildir"),
        ("/home/%u/Maildir", ".hidden", "/home/.hidden/Maildir"),
    ],
)
def test_expand_path(template: str, user: str, expected: str) -> None:
    assert expand_path(template, user) == expected


@pytest.mark.parametrize(
    "user",
    [
        "",
        "../x",
        "a/b",
        "/",
        "\x00",
        "a\x00b",
        ".",
        "..",
        "a\nb",
        "a\rb",
        "a\x7fb",
        "a\x9bb",
        "..@example.com",
        "bob@..",
        "bob@.",
        "@example.com",
        "bob@",
        "\udcff",
        "x" * 256,
        "é" * 128,
    ],
)
def test_unsafe_user_names_rejected(user: str) -> None:
    with pytest.raises(UnsafeNameError):
        expand_path(TEMPLATE, user)
    with pytest.raises(UnsafeNameError):
        validate_user_name(user)


def test_unsafe_name_error_is_a_value_error() -> None:
    assert issubclass(UnsafeNameError, ValueError)


def test_result_checked_against_fixed_directory() -> None:
    """
    Even a safe name is refused if the template's own text climbs out of
    the directory it starts in.
    """
    with pytest.raises(UnsafeNameError):
        expand_path("/srv/mail/%u/../../etc", "bob")


@pytest.mark.parametrize("template", ["relative/%u", "/srv/%x", "/srv/%u/%", "/srv/%U"])
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        check_template(template)
    with pytest.raises(ValueError, match="template"):
        expand_path(template, "bob")


@given(st.text())
def test_any_name_stays_under_the_fixed_directory(user: str) -> None:
    try:
        path = expand_path(TEMPLATE, user)
    except UnsafeNameError:
        return
    assert path.startswith("/var/vmail/")
    assert ".." not in path.split(os.sep)
    assert path == os.path.normpath(path)


@pytest.mark.parametrize("name", ["Sent", "Lists.python", "Entwürfe", "a b", "&AOQ-"])
def test_good_folder_names(name: str) -> None:
    assert validate_folder_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".Sent",
        "Sent.",
        "a..b",
        "a/b",
        "../x",
        "a\x00b",
        "a\tb",
        "x" * 255,
    ],
)
def test_bad_folder_names(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        validate_folder_name(name)
