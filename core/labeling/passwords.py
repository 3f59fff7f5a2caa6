"""Labeler passwords: scrypt with a random per-user salt, never stored or logged in plain text.

A stored hash reads `scrypt$<n>$<r>$<p>$<salt hex>$<key hex>`, so the cost can be raised later
without breaking existing accounts. Checking an unknown user still runs one scrypt, so the
answer's timing does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 200
_N, _R, _P, _KEY_BYTES = 2**14, 8, 1, 32  # ~16 MB and tens of ms per check: cheap for a login, slow to guess
_DUMMY = None


def check_password(password) -> str:
    if not isinstance(password, str):
        raise ValueError("a password must be text")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ValueError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters, "
                         f"got {len(password)}")
    return password


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES,
                          maxmem=256 * n * r + 2**20)


def hash_password(password: str) -> str:
    check_password(password)
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${key.hex()}"


def verify_password(password, stored: str | None) -> bool:
    """Constant-time comparison; a missing account (stored None) costs the same scrypt."""
    global _DUMMY
    if stored is None:
        if _DUMMY is None:
            _DUMMY = hash_password(secrets.token_hex(8))
        stored = _DUMMY
        password = ""  # never matches a random dummy
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, bytes.fromhex(key)) and stored is not _DUMMY
