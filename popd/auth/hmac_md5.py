"""
HMAC-MD5 from a saved context: what Dovecot's C{CRAM-MD5} password scheme
(alias C{HMAC-MD5}) stores, and how CRAM-MD5 (RFC 2195) is checked with it.

HMAC-MD5(key, text) is C{MD5(opad_key + MD5(ipad_key + text))}, where
C{ipad_key} and C{opad_key} are the key padded to one 64-byte block and
XORed with 0x36 and 0x5C.  Dovecot stores the two MD5 states after those
first blocks: 32 bytes, the outer state's words A, B, C, D then the inner
state's, each a little-endian 32-bit number, written as 64 hex digits.  The
password cannot be read back from them, yet any challenge can be answered.

C{hashlib} cannot resume MD5 from a state, so the compression function is
written out here (RFC 1321); it only ever runs over a few blocks.
"""

from __future__ import annotations

import hashlib
import math
import struct

__all__ = ["CONTEXT_SIZE", "context_of", "hmac_md5_with_context"]

#: The size of a stored context: two MD5 states of four 32-bit words.
CONTEXT_SIZE = 32

_BLOCK = 64
_MASK = 0xFFFFFFFF
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4
_SHIFTS += (6, 10, 15, 21) * 4
_CONSTANTS = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple:
    """
    MD5's compression function: C{state} after one 64-byte C{block}.
    """
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & _MASK & d), i
        elif i < 32:
            f, g = (d & b) | (~d & _MASK & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _CONSTANTS[i] + words[g]) & _MASK
        shift = _SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d), strict=True))


def _finish(state: tuple, data: bytes, done: int) -> bytes:
    """
    The MD5 digest of a message whose first C{done} bytes (a whole number
    of blocks) left C{state}, and whose remaining bytes are C{data}.
    """
    length = (done + len(data)) * 8
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % _BLOCK)
    padded += struct.pack("<Q", length & 0xFFFFFFFFFFFFFFFF)
    for start in range(0, len(padded), _BLOCK):
        state = _compress(state, padded[start : start + _BLOCK])
    return struct.pack("<4I", *state)


def _pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.md5(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(k ^ 0x36 for k in key), bytes(k ^ 0x5C for k in key)


def context_of(password: bytes) -> bytes:
    """
    The 32-byte HMAC-MD5 context of C{password}, as Dovecot's CRAM-MD5
    scheme stores it (before hex encoding).
    """
    inner, outer = _pads(password)
    inner_state = _compress(_INITIAL, inner)
    outer_state = _compress(_INITIAL, outer)
    return struct.pack("<8I", *outer_state, *inner_state)


def hmac_md5_with_context(context: bytes, message: bytes) -> bytes:
    """
    HMAC-MD5 of C{message} under the key whose L{context_of} is C{context}.

    @raise ValueError: C{context} is not L{CONTEXT_SIZE} bytes.
    """
    if len(context) != CONTEXT_SIZE:
        raise ValueError("an HMAC-MD5 context is 32 bytes")
    words = struct.unpack("<8I", context)
    inner = _finish(words[4:], message, _BLOCK)
    return _finish(words[:4], inner, _BLOCK)
