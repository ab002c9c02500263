"""
Tests for popd.auth.schemes: Dovecot password schemes.

Fixed vectors come from Dovecot's own test suite (src/lib-auth/
test-password-scheme.c and the self-test samples in password-scheme-crypt.c),
from hashlib by hand, and from the libraries; new hashes are also checked
with the system's crypt(3) where Python still exposes it.
"""

from __future__ import annotations

import base64
import hashlib
import warnings

import argon2
import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

from popd.auth import schemes
from popd.auth.schemes import (
    DEFAULT_SCHEME,
    MAX_PASSWORD_BYTES,
    SCHEMES,
    UnknownScheme,
    dummy_hash,
    hash_password,
    parse_stored,
    plaintext_of,
    verify_password,
)

# Dovecot's test-password-scheme.c: each verifies the password "test".
DOVECOT_VECTORS = [
    "{PLAIN}test",
    "{CRYPT}//EsnG9FLTKjo",
    "{MD5}$1$wmyrgRuV$kImF6.9MAFQNHe23kq5vI/",
    "{SHA1}qUqP5cyxm6YcTAhz05Hph5gvu9M=",
    "{SMD5}JTu1KRwptKZJg/RLd+6Vn5GUd0M=",
    "{LDAP-MD5}CY9rzUYh03PK3k6DJie09g==",
    "{SHA256}n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
    "{SHA512}7iaw3Ur350mqGo7jwQrpkj9hiYB3Lkc/iBml1JQODbJ6wYX4oOHV+E+IvIh/1nsUNzLDBM"
    "xfqa2Ob1f1ACio/w==",
    "{SSHA}H/zrDv8FXUu1JmwvVYijfrYEF34jVZcO",
    "{MD5-CRYPT}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "{BLF-CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$f2iuP4aUeNMrgu34fhOkkg"
    "$1XSZZMWlIs0zmE+snlUIcLADO3GXbA2O/hsQmmc317k",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A"
    "$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
    "{ARGON2}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A"
    "$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
]

# Dovecot's password-scheme-crypt.c self-test samples, key "08/15!test~4711".
CRYPT_KEY = b"08/15!test~4711"
CRYPT_VECTORS = [
    "{DES-CRYPT}JBOZ0DgmtucwE",
    "{SHA256-CRYPT}$5$rounds=1000$0123456789abcdef$K/DksR0DT01hGc8g/kt"
    "9McEgrbFMKi9qrb1jehe7hn4",
    "{SHA512-CRYPT}$6$rounds=1000$0123456789abcdef$ZIAd5WqfyLkpvsVCVUU1GrvqaZTq"
    "vhJoouxdSqJO71l9Ld3tVrfOatEjarhghvEYADkq//LpDnTeO90tcbtHR1",
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def salted(algorithm: str, password: bytes, salt: bytes) -> bytes:
    """
    The raw value of a salted scheme, computed by hand.
    """
    return hashlib.new(algorithm, password + salt).digest() + salt


def system_crypt():
    """
    The stdlib crypt module (a binding of the system's crypt(3)), or skip.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("crypt")


@pytest.mark.parametrize("stored", DOVECOT_VECTORS)
def test_dovecot_vectors(stored):
    assert verify_password(stored, b"test")
    assert not verify_password(stored, b"Test")
    assert not verify_password(stored, b"test ")
    assert not verify_password(stored, b"")


@pytest.mark.parametrize("stored", CRYPT_VECTORS)
def test_dovecot_crypt_samples(stored):
    assert verify_password(stored, CRYPT_KEY)
    assert not verify_password(stored, b"X" + CRYPT_KEY[1:])
    # CRYPT, Dovecot's default, reads every crypt(3) format; so does a bare
    # value without a {SCHEME} prefix.
    data = stored.split("}", 1)[1]
    assert verify_password("{CRYPT}" + data, CRYPT_KEY)
    assert verify_password(data, CRYPT_KEY)
    assert not verify_password(data, b"test")


SALT = bytes(range(7))


@pytest.mark.parametrize(
    ("scheme", "algorithm"),
    [("SSHA", "sha1"), ("SSHA256", "sha256"), ("SSHA512", "sha512"), ("SMD5", "md5")],
)
def test_salted_schemes_by_hand(scheme, algorithm):
    raw = salted(algorithm, b"s3cret", SALT)
    stored = f"{{{scheme}}}{b64(raw)}"
    assert verify_password(stored, b"s3cret")
    assert not verify_password(stored, b"s3creT")
    # The salt is part of the value: a different salt is a different hash.
    other = salted(algorithm, b"s3cret", b"other salt")
    assert not verify_password(
        f"{{{scheme}}}{b64(raw[: -len(SALT)] + other[-10:])}", b"s3cret"
    )
    # An explicit encoding suffix works too.
    assert verify_password(f"{{{scheme}.HEX}}{raw.hex()}", b"s3cret")
    assert verify_password(f"{{{scheme}.b64}}{b64(raw)}", b"s3cret")


@pytest.mark.parametrize(
    ("scheme", "algorithm"),
    [
        ("SHA", "sha1"),
        ("SHA1", "sha1"),
        ("SHA256", "sha256"),
        ("SHA512", "sha512"),
        ("LDAP-MD5", "md5"),
    ],
)
def test_unsalted_digests_by_hand(scheme, algorithm):
    digest = hashlib.new(algorithm, "pässword".encode()).digest()
    for stored in (
        f"{{{scheme}}}{b64(digest)}",
        # Without a suffix, a value twice the digest's size is hex (Dovecot).
        f"{{{scheme}}}{digest.hex()}",
        f"{{{scheme}}}{digest.hex().upper()}",
        f"{{{scheme}.HEX}}{digest.hex()}",
        f"{{{scheme}.BASE64}}{b64(digest)}",
    ):
        assert verify_password(stored, "pässword".encode()), stored
        assert not verify_password(stored, b"password"), stored


def test_plain_md5_is_hex():
    digest = hashlib.md5(b"test").hexdigest()
    assert verify_password("{PLAIN-MD5}" + digest, b"test")
    assert verify_password("{MD5}" + digest, b"test")  # Dovecot's MD5 alias
    assert not verify_password("{PLAIN-MD5}" + digest, b"tset")


def test_library_made_crypt_hashes():
    values = {
        "{SHA512-CRYPT}": sha512_crypt.using(rounds=7000).hash(b"pw"),
        "{SHA256-CRYPT}": sha256_crypt.using(rounds=5000).hash(b"pw"),
        "{MD5-CRYPT}": md5_crypt.hash(b"pw"),
        "{BLF-CRYPT}": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode(),
        # Four lanes, unlike libsodium's one.
        "{ARGON2ID}": argon2.PasswordHasher(memory_cost=8192, parallelism=4).hash(
            b"pw"
        ),
    }
    for prefix, data in values.items():
        for stored in (prefix + data, data, "{CRYPT}" + data):
            assert verify_password(stored, b"pw"), stored
            assert not verify_password(stored, b"pW"), stored


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_prefixes(prefix):
    data = prefix + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()[4:]
    assert verify_password("{BLF-CRYPT}" + data, b"pw")
    assert not verify_password("{BLF-CRYPT}" + data, b"px")


def test_bcrypt_reads_only_72_bytes_like_dovecot():
    data = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    assert verify_password("{BLF-CRYPT}" + data, b"x" * 80)
    assert not verify_password("{BLF-CRYPT}" + data, b"x" * 71)


def test_scheme_names_are_case_insensitive():
    assert verify_password("{plain}test", b"test")
    assert verify_password("{Clear}test", b"test")
    assert verify_password("{cleartext}test", b"test")
    assert verify_password("{plain.b64}dGVzdA==", b"test")
    assert verify_password("{Plain.Hex}74657374", b"test")
    assert verify_password(
        CRYPT_VECTORS[2].replace("SHA512-CRYPT", "sha512-crypt"), CRYPT_KEY
    )
    assert verify_password("{ssha}" + b64(salted("sha1", b"test", SALT)), b"test")


def test_named_variant_must_match_data():
    sha256_data = CRYPT_VECTORS[1].split("}", 1)[1]
    assert not verify_password("{SHA512-CRYPT}" + sha256_data, CRYPT_KEY)
    assert not verify_password("{MD5-CRYPT}" + sha256_data, CRYPT_KEY)
    assert not verify_password("{BLF-CRYPT}" + sha256_data, CRYPT_KEY)
    argon2i = DOVECOT_VECTORS[11].split("}", 1)[1]
    assert not verify_password("{ARGON2ID}" + argon2i, b"test")
    assert verify_password("{ARGON2}" + argon2i, b"test")


def test_plaintext_encodings():
    assert verify_password("{PLAIN.B64}" + b64(b"a:b\n\xff"), b"a:b\n\xff")
    assert verify_password("{CLEAR.HEX}" + b"a:b".hex(), b"a:b")
    assert not verify_password("{PLAIN.B64}" + b64(b"a:b"), b"a:c")
    # UTF-8 plaintext compares as its UTF-8 bytes.
    assert verify_password("{PLAIN}pässword", "pässword".encode())
    assert not verify_password("{PLAIN}pässword", "pässword".encode("latin-1"))


MALFORMED = [
    "",
    "{PLAIN}",  # an empty password never matches
    "{CRYPT}",
    "{NOPE}test",
    "{PLAIN",
    "{PLAIN.ROT13}test",
    "{SHA256}!!!not base64!!!",
    "{SHA256}" + b64(b"too short"),
    "{SHA256}é",
    "{SHA256.HEX}zz",
    "{SSHA512}" + b64(hashlib.sha512(b"test").digest()),  # no salt
    "{SHA512-CRYPT}$6$",
    "{SHA512-CRYPT}$6$salt$garbage",
    "{SHA512-CRYPT}$6$rounds=x$salt$hash",
    "{MD5-CRYPT}$1$",
    "{BLF-CRYPT}$2y$99$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    "{BLF-CRYPT}$2y$05$short",
    "{ARGON2ID}$argon2id$v=19$bad",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A$",
    "{DES-CRYPT}tooshort",
    "{PLAIN.B64}not base64!",
    "plain-looking-but-bare",
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_values_do_not_match(stored):
    for password in (b"test", b"", stored.encode()):
        assert verify_password(stored, password) is False


@given(stored=st.text(max_size=200), password=st.binary(max_size=100))
def test_verify_never_raises(stored, password):
    assert verify_password(stored, password) in (True, False)


@given(
    scheme=st.sampled_from(["SHA", "SSHA512", "PLAIN.B64", "BLF-CRYPT", "ARGON2ID"]),
    data=st.text(max_size=80),
)
def test_verify_never_raises_for_known_schemes(scheme, data):
    assert verify_password(f"{{{scheme}}}{data}", b"test") in (True, False)


def test_overlong_password_never_matches():
    password = b"x" * (MAX_PASSWORD_BYTES + 1)
    assert not verify_password("{PLAIN}" + password.decode(), password)
    assert verify_password("{PLAIN}" + "x" * MAX_PASSWORD_BYTES, password[:-1])


def test_parse_stored():
    assert parse_stored("{SHA512-CRYPT}$6$x$y") == ("SHA512-CRYPT", "$6$x$y")
    assert parse_stored("{plain.b64}dGVzdA==") == ("PLAIN.B64", "dGVzdA==")
    assert parse_stored("{PLAIN}a}b") == ("PLAIN", "a}b")
    assert parse_stored("$6$x$y") == ("CRYPT", "$6$x$y")
    assert parse_stored("") == ("CRYPT", "")
    for bad in ("{NOPE}x", "{PLAIN.ROT13}x", "{PLAIN", "{}x"):
        with pytest.raises(UnknownScheme):
            parse_stored(bad)
    assert issubclass(UnknownScheme, ValueError)


# Cheaper costs for tests that hash many times; the defaults get their own.
CHEAP_ROUNDS = {
    "ARGON2ID": 1,
    "BLF-CRYPT": 4,
    "SHA512-CRYPT": 1000,
    "SHA256-CRYPT": 1000,
    "SCRAM-SHA-256": 64,
    "SCRAM-SHA-1": 64,
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hash_password_round_trip(scheme):
    stored = hash_password(b"correct horse", scheme)
    assert stored.startswith("{" + scheme + "}")
    assert verify_password(stored, b"correct horse")
    assert not verify_password(stored, b"correct horsE")
    for password in ("pässwörd".encode(), b"x", b"a:b", b"\xff\x01"):
        stored = hash_password(password, scheme, rounds=CHEAP_ROUNDS.get(scheme))
        assert stored.startswith("{" + scheme + "}") or stored.startswith("{PLAIN.B64}")
        assert verify_password(stored, password)
        assert not verify_password(stored, password + b"!")
        assert parse_stored(stored)[0] in (scheme, "PLAIN.B64")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hash_password_scheme_name_case_insensitive(scheme):
    stored = hash_password(b"pw", scheme.lower(), rounds=CHEAP_ROUNDS.get(scheme))
    assert stored.startswith("{" + scheme + "}")
    assert verify_password(stored, b"pw")


# CRAM-MD5 keeps an HMAC-MD5 context, which has no salt (as in Dovecot).
@pytest.mark.parametrize(
    "scheme", [s for s in SCHEMES if s not in ("PLAIN", "CRAM-MD5")]
)
def test_hash_password_is_salted(scheme):
    rounds = CHEAP_ROUNDS.get(scheme)
    assert hash_password(b"pw", scheme, rounds=rounds) != hash_password(
        b"pw", scheme, rounds=rounds
    )


def test_default_scheme_is_argon2id():
    assert DEFAULT_SCHEME == "ARGON2ID"
    assert hash_password(b"pw").startswith("{ARGON2ID}$argon2id$")


def test_argon2id_looks_like_doveadm_output():
    # libsodium (and so doveadm) writes t=3, 64 MiB, one lane.
    stored = hash_password(b"pw", "ARGON2ID")
    data = stored.removeprefix("{ARGON2ID}")
    assert data.startswith("$argon2id$v=19$m=65536,t=3,p=1$")
    assert argon2.PasswordHasher().verify(data, b"pw")


def test_sha_crypt_looks_like_doveadm_output():
    crypt = None
    for scheme, ident in (("SHA512-CRYPT", "6"), ("SHA256-CRYPT", "5")):
        data = hash_password(b"pw", scheme).removeprefix("{" + scheme + "}")
        _, got_ident, salt, digest = data.split("$")
        assert got_ident == ident  # 5000 rounds are implicit, as in doveadm
        assert len(salt) == 16
        assert (sha512_crypt if ident == "6" else sha256_crypt).verify(b"pw", data)
        crypt = crypt or system_crypt()
        assert crypt.crypt("pw", data) == data


def test_blf_crypt_looks_like_doveadm_output():
    data = hash_password(b"pw", "BLF-CRYPT").removeprefix("{BLF-CRYPT}")
    assert data.startswith("$2y$12$")
    assert len(data) == 60
    assert bcrypt.checkpw(b"pw", data.encode())
    assert system_crypt().crypt("pw", data) == data


def test_ssha512_by_hand():
    stored = hash_password(b"pw", "SSHA512")
    raw = base64.b64decode(stored.removeprefix("{SSHA512}"), validate=True)
    digest, salt = raw[:64], raw[64:]
    assert len(salt) == 16
    assert hashlib.sha512(b"pw" + salt).digest() == digest


def test_rounds():
    assert "$rounds=10000$" in hash_password(b"pw", "SHA512-CRYPT", rounds=10000)
    assert hash_password(b"pw", "BLF-CRYPT", rounds=4).startswith("{BLF-CRYPT}$2y$04$")
    assert ",t=2," in hash_password(b"pw", "ARGON2ID", rounds=2)
    with pytest.raises(ValueError):
        hash_password(b"pw", "BLF-CRYPT", rounds=99)
    with pytest.raises(ValueError):
        hash_password(b"pw", "SHA512-CRYPT", rounds=10)


def test_plain_falls_back_to_base64_when_a_line_cannot_hold_it():
    assert hash_password(b"simple pass", "PLAIN") == "{PLAIN}simple pass"
    assert hash_password("päss".encode(), "PLAIN") == "{PLAIN}päss"
    for password in (b"a:b", b"a\nb", b"a\r", b"\x7f", b"\xff\xfe"):
        stored = hash_password(password, "PLAIN")
        assert stored == "{PLAIN.B64}" + b64(password)
        assert verify_password(stored, password)


def test_hash_password_refuses():
    with pytest.raises(UnknownScheme):
        hash_password(b"pw", "SHA1")  # verifiable but not for new hashes
    with pytest.raises(UnknownScheme):
        hash_password(b"pw", "NOPE")
    with pytest.raises(ValueError, match="NUL"):
        hash_password(b"p\0w", "ARGON2ID")
    with pytest.raises(ValueError, match="72"):
        hash_password(b"x" * 73, "BLF-CRYPT")
    with pytest.raises(ValueError):
        hash_password(b"x" * (MAX_PASSWORD_BYTES + 1), "SSHA512")


def test_plaintext_of():
    assert plaintext_of("{PLAIN}test") == b"test"
    assert plaintext_of("{clear}test") == b"test"
    assert plaintext_of("{CLEARTEXT}pässword") == "pässword".encode()
    assert plaintext_of("{PLAIN.B64}" + b64(b"a:b")) == b"a:b"
    assert plaintext_of("{PLAIN.HEX}" + b"a:b".hex()) == b"a:b"
    assert plaintext_of("{PLAIN}") is None
    assert plaintext_of("{PLAIN.B64}!!") is None
    assert plaintext_of("{NOPE}test") is None
    assert plaintext_of("test") is None  # bare means CRYPT
    for stored in DOVECOT_VECTORS[1:]:
        assert plaintext_of(stored) is None, stored


def test_dummy_hash():
    first = dummy_hash()
    assert schemes.DUMMY_HASH == first == dummy_hash()
    assert first.startswith("{ARGON2ID}$argon2id$")
    assert not verify_password(first, b"")
    with pytest.raises(AttributeError):
        schemes.NOT_THERE  # noqa: B018


# SCRAM, CRAM-MD5, MD5-CRYPT and SSHA256, against what Dovecot makes

# `doveadm pw -s SCHEME -p password` (Dovecot 2.3).
DOVEADM_VECTORS = {
    "SCRAM-SHA-256": "{SCRAM-SHA-256}4096,0zoYprpVPdKZ3w5tk4KT1Q==,"
    "aK39wT2gmjtQkdFsaWMqjkdQmKUyZPdIvhPAWTiI42c=,"
    "a58940OTLStwqDlO9utTlt/meUFjpjuR6eDTZXM8cMk=",
    "SCRAM-SHA-1": "{SCRAM-SHA-1}4096,30DFiLDV02ql5AziDhu1Mw==,"
    "QFGXQoqNQ7p5FYitbzIrYk029o4=,eu2VmpBb/U1MEdS37WehcKWR8kc=",
    "CRAM-MD5": "{CRAM-MD5}9186d855e11eba527a7a52ca82b313e1"
    "80d62234f0acc9051b527243d41e2740",
    "MD5-CRYPT": "{MD5-CRYPT}$1$LBTLWcBm$quogKUHFOv8N6V0x/QfWx.",
    "SSHA256": "{SSHA256}w2UUsZ2uAi6yYXZoE1CKOEL/98YU1bTXp6+i4SFDVN0HfRna",
}


@pytest.mark.parametrize("stored", DOVEADM_VECTORS.values())
def test_doveadm_made_values(stored):
    assert verify_password(stored, b"password")
    assert not verify_password(stored, b"Password")
    assert not verify_password(stored, b"")


def test_hmac_md5_alias_and_hex_encodings():
    data = DOVEADM_VECTORS["CRAM-MD5"].removeprefix("{CRAM-MD5}")
    assert verify_password("{HMAC-MD5}" + data, b"password")
    assert verify_password("{CRAM-MD5.HEX}" + data, b"password")
    raw = bytes.fromhex(data)
    assert verify_password("{CRAM-MD5.B64}" + b64(raw), b"password")
    assert not verify_password("{CRAM-MD5}" + data[:-2], b"password")


def test_new_schemes_are_hashable_and_look_like_doveadm_output():
    scram = hash_password(b"pw", "SCRAM-SHA-256")
    iterations, salt, stored_key, server_key = scram.split("}")[1].split(",")
    assert iterations == "4096"
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(stored_key)) == len(base64.b64decode(server_key)) == 32
    scram1 = hash_password(b"pw", "SCRAM-SHA-1", rounds=10000)
    assert scram1.startswith("{SCRAM-SHA-1}10000,")
    assert verify_password(scram1, b"pw")
    cram = hash_password(b"password", "CRAM-MD5")
    assert cram == DOVEADM_VECTORS["CRAM-MD5"]
    assert hash_password(b"pw", "MD5-CRYPT").startswith("{MD5-CRYPT}$1$")
    ssha256 = hash_password(b"pw", "SSHA256")
    raw = base64.b64decode(ssha256.removeprefix("{SSHA256}"))
    assert raw[:32] == hashlib.sha256(b"pw" + raw[32:]).digest()


def test_scram_iterations_are_bounded():
    with pytest.raises(ValueError, match="SCRAM iterations"):
        hash_password(b"pw", "SCRAM-SHA-256", rounds=10**9)
    stored = DOVEADM_VECTORS["SCRAM-SHA-256"].replace("4096,", "99999999999,")
    assert not verify_password(stored, b"password")


@pytest.mark.parametrize(
    "stored",
    [
        "{SCRAM-SHA-256}4096,c2FsdA==,AAAA,AAAA",  # keys of the wrong size
        "{SCRAM-SHA-256}4096,c2FsdA==",
        "{SCRAM-SHA-256}0," + DOVEADM_VECTORS["SCRAM-SHA-256"].split(",", 1)[1],
        "{SCRAM-SHA-256}x," + DOVEADM_VECTORS["SCRAM-SHA-256"].split(",", 1)[1],
        "{SCRAM-SHA-256}4096,!!," + DOVEADM_VECTORS["SCRAM-SHA-256"].split(",", 2)[2],
        # A SHA-1 secret under the SHA-256 name.
        "{SCRAM-SHA-256}" + DOVEADM_VECTORS["SCRAM-SHA-1"].split("}")[1],
        "{SCRAM-SHA-1}",
        "{CRAM-MD5}zz",
    ],
)
def test_malformed_new_values_never_match(stored):
    assert verify_password(stored, b"password") is False
    assert schemes.secret_kinds(stored) == frozenset()


def test_secret_kinds():
    kinds = schemes.secret_kinds
    everything = {"PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert kinds("{PLAIN}pw") == everything
    assert kinds("{PLAIN.B64}" + b64(b"pw")) == everything
    assert kinds("{PLAIN}") == frozenset()
    assert kinds(DOVEADM_VECTORS["CRAM-MD5"]) == {"CRAM-MD5"}
    assert kinds(DOVEADM_VECTORS["SCRAM-SHA-1"]) == {"SCRAM-SHA-1"}
    assert kinds(DOVEADM_VECTORS["SCRAM-SHA-256"]) == {"SCRAM-SHA-256"}
    for stored in (DOVEADM_VECTORS["MD5-CRYPT"], DOVEADM_VECTORS["SSHA256"], "x"):
        assert kinds(stored) == frozenset()


def test_scram_secret_and_cram_context_of():
    secret = schemes.scram_secret_of(DOVEADM_VECTORS["SCRAM-SHA-256"], "SHA-256")
    assert secret.iterations == 4096 and secret.algorithm == "SHA-256"
    assert "aK39" not in repr(secret)  # keys never shown
    assert schemes.scram_secret_of(DOVEADM_VECTORS["SCRAM-SHA-256"], "SHA-1") is None
    assert schemes.scram_secret_of("{PLAIN}pw", "SHA-256") is None
    context = schemes.cram_md5_context_of(DOVEADM_VECTORS["CRAM-MD5"])
    assert context.hex() == DOVEADM_VECTORS["CRAM-MD5"].removeprefix("{CRAM-MD5}")
    assert schemes.cram_md5_context_of("{PLAIN}password") is None


@given(key=st.binary(max_size=200), message=st.binary(max_size=300))
def test_hmac_md5_from_a_stored_context(key, message):
    import hmac as hmac_module

    from popd.auth import hmac_md5

    context = hmac_md5.context_of(key)
    assert hmac_md5.hmac_md5_with_context(context, message) == (
        hmac_module.new(key, message, hashlib.md5).digest()
    )


# Against doveadm itself, where it is installed


def _doveadm():
    import shutil

    path = shutil.which("doveadm")
    if path is None:
        pytest.skip("doveadm (Dovecot) is not installed: cannot compare with it")
    return path


def _run(*arguments: str) -> str:
    import subprocess

    result = subprocess.run(
        [_doveadm(), *arguments], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


NEW_SCHEMES = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "MD5-CRYPT", "SSHA256")


@pytest.mark.parametrize("scheme", NEW_SCHEMES)
def test_popd_verifies_what_doveadm_makes(scheme):
    for password in ("password", "pässwörd with spaces"):
        stored = _run("pw", "-s", scheme, "-p", password)
        assert stored.startswith("{" + scheme + "}")
        assert verify_password(stored, password.encode())
        assert not verify_password(stored, password.encode() + b"x")


@pytest.mark.parametrize("scheme", NEW_SCHEMES)
def test_doveadm_verifies_what_popd_makes(scheme):
    for password in ("password", "pässwörd with spaces"):
        stored = hash_password(password.encode(), scheme)
        assert "(verified)" in _run("pw", "-t", stored, "-p", password)


# is_cheap: which values a checker may verify on the reactor thread

CHEAP_VALUES = [
    "{PLAIN}test",
    "{CLEAR}test",
    "{CLEARTEXT}test",
    "{PLAIN.B64}" + b64(b"test"),
    "{plain.hex}" + b"test".hex(),
    "{PLAIN-MD5}" + hashlib.md5(b"test").hexdigest(),
    "{LDAP-MD5}CY9rzUYh03PK3k6DJie09g==",
    "{SHA}" + b64(hashlib.sha1(b"test").digest()),
    "{SHA1}qUqP5cyxm6YcTAhz05Hph5gvu9M=",
    "{SHA256}n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
    "{SHA256.HEX}" + hashlib.sha256(b"test").hexdigest(),
    "{SHA512}" + b64(hashlib.sha512(b"test").digest()),
    "{SMD5}JTu1KRwptKZJg/RLd+6Vn5GUd0M=",
    "{SSHA}H/zrDv8FXUu1JmwvVYijfrYEF34jVZcO",
    DOVEADM_VECTORS["SSHA256"],
    hash_password(b"test", "SSHA512"),
    DOVEADM_VECTORS["CRAM-MD5"],
    "{HMAC-MD5}" + DOVEADM_VECTORS["CRAM-MD5"].removeprefix("{CRAM-MD5}"),
]

NOT_CHEAP_VALUES = [
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A"
    "$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$f2iuP4aUeNMrgu34fhOkkg"
    "$1XSZZMWlIs0zmE+snlUIcLADO3GXbA2O/hsQmmc317k",
    "{BLF-CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    hash_password(b"test", "SHA512-CRYPT", rounds=1000),
    hash_password(b"test", "SHA256-CRYPT", rounds=1000),
    DOVEADM_VECTORS["MD5-CRYPT"],
    "{MD5}$1$wmyrgRuV$kImF6.9MAFQNHe23kq5vI/",
    "{CRYPT}//EsnG9FLTKjo",
    "{DES-CRYPT}//EsnG9FLTKjo",
    "$6$salt$bare-crypt-is-crypt",
    DOVEADM_VECTORS["SCRAM-SHA-256"],
    DOVEADM_VECTORS["SCRAM-SHA-1"],
]


@pytest.mark.parametrize("stored", CHEAP_VALUES)
def test_plain_and_digest_schemes_are_cheap(stored):
    assert schemes.is_cheap(stored) is True
    assert verify_password(stored, b"test") or verify_password(stored, b"password")


@pytest.mark.parametrize("stored", NOT_CHEAP_VALUES)
def test_slow_schemes_are_not_cheap(stored):
    assert schemes.is_cheap(stored) is False


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "{NOPE}test",
        "{PLAIN",
        "{PLAIN.ROT13}test",
        "{SHA256}!!!not base64!!!",
        "{SHA256}" + b64(b"too short"),
        "{SHA256}é",
        "{CRAM-MD5}zz",
    ],
)
def test_unknown_and_malformed_values_are_not_cheap(stored):
    assert schemes.is_cheap(stored) is False


@given(stored=st.text(max_size=200))
def test_is_cheap_never_raises(stored):
    assert schemes.is_cheap(stored) in (True, False)


def test_default_and_dummy_hashes_are_not_cheap():
    assert not schemes.is_cheap(dummy_hash())
    assert not schemes.is_cheap(hash_password(b"test"))
