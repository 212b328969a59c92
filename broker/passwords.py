"""mosquitto's password file, written and checked in Python.

An entry is ``username:$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512
of the password with a 12-byte salt, a 64-byte hash (mosquitto 2.0's ``sha512-pbkdf2``,
what ``mosquitto_passwd`` writes). mosquitto reads a line up to the first ``:`` as the
username, skips lines starting with ``#`` and re-reads the file on SIGHUP.

Iterations: 101, mosquitto_passwd's own default. The passwords fedmq generates are 192
random bits, which no amount of key stretching makes stronger or weaker against a stolen
file; and mosquitto is single-threaded, so every connect's hash holds up every other
client: 1,000 nodes reconnecting after a broker restart with 100,000 iterations would
stall a Raspberry Pi broker for a minute or more.
"""

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

ITERATIONS = 101
SALT_BYTES = 12  # mosquitto refuses any other salt length
HASH_BYTES = 64  # SHA-512


def new_password() -> str:
    """192 random bits, URL-safe base64 (no ``:``, no whitespace)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The ``$7$...`` hash mosquitto checks ``password`` against."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"mosquitto needs a {SALT_BYTES}-byte salt, not {len(salt)}")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"$7${iterations}${'$'.join(encoded)}"


def verify(hashed: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (recomputed, compared in constant time)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit():
        return False
    try:
        salt, digest = (base64.b64decode(p, validate=True) for p in parts[3:])
    except ValueError:
        return False
    if len(salt) != SALT_BYTES or len(digest) != HASH_BYTES or int(parts[2]) < 1:
        return False
    again = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(again, digest)


def parse(text: str) -> dict[str, str]:
    """Username -> hash, as mosquitto reads the file (comments and lines without ``:``
    skipped)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        username, _, hashed = line.partition(":")
        entries[username.strip()] = hashed.strip()
    return entries


def render(entries: dict[str, str]) -> str:
    """The file's text, users sorted."""
    lines = ["# fedmq broker passwords (mosquitto password_file). Edit with `fedmq broker`."]
    for username in sorted(entries):
        if not username or any(c in username for c in ":\n\r#") or username != username.strip():
            raise ValueError(f"username {username!r} cannot go in a mosquitto password file")
        lines.append(f"{username}:{entries[username]}")
    return "\n".join(lines) + "\n"


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (a reader such as a reloading
    mosquitto sees the old file or the new one, never half of it). A file replaced keeps
    its owner: an operator who gave the password file to the mosquitto user and then runs
    ``add-node`` as root must not lock the broker out of it at the next reload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
        file.flush()
        if path.exists():
            previous = path.stat()
            if (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(file.fileno(), previous.st_uid, previous.st_gid)
        os.fsync(file.fileno())
    os.replace(temporary, path)
