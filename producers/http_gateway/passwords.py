"""Password hashes of the built-in issuer: Argon2id (argon2-cffi, RFC 9106's low-memory
profile: 64 MiB, 3 passes, 4 lanes). Hashing takes tens of milliseconds of CPU on purpose: callers
on an event loop run it in a thread."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 8
MAX_LENGTH = 1024

_HASHER = PasswordHasher()
_DUMMY: str | None = None


def check_new(password: str) -> str:
    """A password fit to be set, or ValueError saying why not."""
    if len(password) < MIN_LENGTH:
        raise ValueError(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"a password has at most {MAX_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(check_new(password))


def verify(password_hash: str | None, password: str) -> bool:
    """True when `password` matches. With no hash (no such user) a dummy hash is checked all the
    same, so that an unknown user takes as long to refuse as a wrong password."""
    global _DUMMY
    unknown = password_hash is None
    if unknown:
        if _DUMMY is None:
            _DUMMY = _HASHER.hash("labbus: no such user")
        password_hash = _DUMMY
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(password_hash, password) and not unknown
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """The hash was made with other parameters than today's (rehash at the next login)."""
    return _HASHER.check_needs_rehash(password_hash)
