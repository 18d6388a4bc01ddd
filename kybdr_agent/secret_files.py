"""Secret files: the master keys, database passwords and control tokens the configuration points at.

Every secret is a file named in the configuration, never a value in it. ``config check``, the start of
``run`` and a reload read every one of them with the same rules, so a file that would make every backup
fail (a missing password file, a 31-byte key) or that leaks (a key anyone may read, a token anyone may
overwrite) stops the agent before it reports ready, instead of turning up at 02:00. The one-shot commands
load the keys and the password through the same functions.

The rules, for every file:

- it exists and is a regular file (a directory, FIFO or device is refused; a FIFO would block the read);
- its owner is root, the user running the command, or ``daemon.service_user`` (whom the service runs as):
  anyone else could replace its content with theirs;
- nobody but its owner may write it and nobody but owner and group may read it: mode 0600, or 0640 with a
  group of readers (the service's group);
- it is small (a secret of more than 64 KiB is a misconfigured path, not a secret);
- and its content has the right form for what it is (32 bytes for a key; UTF-8 text for a password or
  token; a token of at least 16 printable characters).

Each error is one line naming the configuration field and the file, and never any of the file's content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from kybdr_agent.backup.keys import KeyMaterialError, KeyRing, MasterKey, WrappingKey, parse_key_material
from kybdr_agent.errors import ConfigError

if TYPE_CHECKING:
    from kybdr_agent.config import AgentSettings

Role = Literal["viewer", "operator", "admin"]

MAX_SECRET_BYTES: Final = 64 * 1024
MIN_TOKEN_CHARS: Final = 16
MAX_TOKEN_CHARS: Final = 4096
# Group read is the one permission beyond the owner's a secret may have (0640 for a service group).
_FORBIDDEN_MODE: Final = (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP


class SecretFileError(ConfigError):
    """A secret file breaks a rule; the message names the field and the file, never the content."""


def trusted_owners(service_user: str | None) -> frozenset[int]:
    """Who may own a secret file or the control socket: root, whoever runs this, the service's user.

    The service user matters because the shipped unit runs the agent as ``kybdr`` while people run
    ``config check`` and the CLI as root or as themselves: a kybdr-owned key file or socket is the agent's
    own, not an intruder's. A name that does not exist on this host adds nobody.
    """
    owners = {0, os.geteuid()}
    if service_user:
        # No such user on this host adds nobody (ValueError: a NUL in the name).
        with contextlib.suppress(KeyError, OSError, ValueError):
            owners.add(pwd.getpwnam(service_user).pw_uid)
    return frozenset(owners)


def describe_owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, OSError):
        return f"uid {uid}"


def read_secret_file(path: Path, field: str, owners: Iterable[int]) -> bytes:
    """The file's bytes, after checking type, owner and mode on the descriptor that is then read.

    Checked with ``fstat`` on the opened descriptor, not ``stat`` on the name, so what is checked is what
    is read. ``O_NONBLOCK`` makes opening a FIFO return at once (to be refused) instead of waiting for a
    writer that never comes; it changes nothing for a regular file.
    """
    where = f"{field} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SecretFileError(f"{where}: does not exist") from None
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise SecretFileError(f"{where}: is a directory, not a file") from None
        raise SecretFileError(f"{where}: cannot be read: {exc.strerror}") from None
    except ValueError:  # an embedded NUL byte: config validation refuses those, but never raise past here
        raise SecretFileError(f"{where}: not a valid path") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SecretFileError(f"{where}: is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{where}: is not a regular file (a FIFO, socket or device cannot hold a secret)")
        allowed = frozenset(owners)
        if info.st_uid not in allowed:
            raise SecretFileError(
                f"{where}: owned by {describe_owner(info.st_uid)}, who could replace it; it must be owned by "
                "root, by the user running kybdr-agent or by daemon.service_user (chown it)"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & _FORBIDDEN_MODE:
            raise SecretFileError(
                f"{where}: mode {mode:04o} lets others {_what_others_may(mode)} it; "
                "chmod 600 (or 640 to let the service's group read it)"
            )
        if info.st_size > MAX_SECRET_BYTES:
            raise SecretFileError(f"{where}: {info.st_size} bytes is too large for a secret (at most 64 KiB)")
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_SECRET_BYTES:
            raise SecretFileError(f"{where}: too large for a secret (at most 64 KiB)")
        return b"".join(chunks)
    except OSError as exc:
        raise SecretFileError(f"{where}: cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _what_others_may(mode: int) -> str:
    may = []
    if mode & (stat.S_IROTH):
        may.append("read")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        may.append("change")
    if mode & (stat.S_IXGRP | stat.S_IXOTH):
        may.append("execute")
    return " and ".join(may) or "use"


def _text(raw: bytes, where: str, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretFileError(f"{where}: not UTF-8 text (byte {exc.start}): a {what} file must be UTF-8") from None
    if "\x00" in text:
        raise SecretFileError(f"{where}: contains a NUL byte; a {what} cannot")
    return text


# --- keys ---------------------------------------------------------------------------------------


def load_key(path: Path, field: str, owners: Iterable[int]) -> MasterKey:
    """A master key file checked by the rules above, then parsed as ``keys.parse_key_material`` does."""
    raw = read_secret_file(path, field, owners)
    try:
        return MasterKey(parse_key_material(raw), source=f"{field} {path}")
    except KeyMaterialError as exc:
        raise SecretFileError(f"{field} {path}: {exc}") from None


def load_keyring(settings: AgentSettings) -> KeyRing | None:
    """The configured key ring, every key file checked; None when there is no current key (no key_file and
    the provider is "file"): then only unencrypted backups can be made and opened.

    The current key is ``key_file``, or with ``key_provider = "kms"`` the KMS key; the older ones are
    ``old_key_files``, and ``kms_key_id`` when the provider is a file (so backups it wrapped still open after
    moving away from KMS). Nothing here talks to KMS: its client opens on first use.
    """
    enc = settings.encryption
    if enc.key_provider == "file" and enc.key_file is None:
        return None
    owners = trusted_owners(settings.daemon.service_user)
    older: list[WrappingKey] = [
        load_key(path, f"encryption.old_key_files[{index}]", owners) for index, path in enumerate(enc.old_key_files)
    ]
    kms = None
    if enc.kms_key_id:
        from kybdr_agent.backup.kms import KmsKey

        kms = KmsKey(enc.kms_key_id, region=settings.kms_region())
    if enc.key_provider == "kms":
        assert kms is not None  # EncryptionSettings refuses key_provider "kms" without kms_key_id
        return KeyRing(kms, older)
    assert enc.key_file is not None
    current = load_key(enc.key_file, "encryption.key_file", owners)
    return KeyRing(current, [*older, *([kms] if kms is not None else [])])


# --- passwords ----------------------------------------------------------------------------------


def read_password(path: Path, field: str, owners: Iterable[int]) -> str:
    """A password file's content as ``postgres.connection.Connection`` will use it (trailing newlines removed).

    Empty is refused: libpq would then try no password at all and every backup would fail on
    authentication, long after the agent said it was ready.
    """
    where = f"{field} {path}"
    password = _text(read_secret_file(path, field, owners), where, "password").rstrip("\r\n")
    if not password:
        raise SecretFileError(f"{where}: is empty")
    return password


def check_password_files(settings: AgentSettings, *, drill: bool = True) -> None:
    owners = trusted_owners(settings.daemon.service_user)
    if settings.database.password_file is not None:
        read_password(settings.database.password_file, "database.password_file", owners)
    if drill and settings.drill.password_file is not None:
        read_password(settings.drill.password_file, "drill.password_file", owners)
    if settings.dr.enabled and settings.dr.password_file is not None:
        read_password(settings.dr.password_file, "dr.password_file", owners)


# --- control tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    path: Path


def read_token(path: Path, field: str, owners: Iterable[int]) -> str:
    where = f"{field} {path}"
    token = _text(read_secret_file(path, field, owners), where, "token").strip()
    if not token:
        raise SecretFileError(f"{where}: is empty")
    if any(not 0x21 <= ord(char) <= 0x7E for char in token):
        raise SecretFileError(
            f"{where}: a token is printable ASCII without spaces (make one with: openssl rand -base64 32)"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise SecretFileError(f"{where}: the token is shorter than {MIN_TOKEN_CHARS} characters")
    if len(token) > MAX_TOKEN_CHARS:
        raise SecretFileError(f"{where}: the token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def load_tokens(entries: Sequence[tuple[str, Path]], owners: Iterable[int] | None = None) -> dict[str, Role]:
    """Token → role for the control API. Two entries with one token are refused: which role would win?"""
    allowed = frozenset(owners) if owners is not None else trusted_owners(None)
    tokens: dict[str, Role] = {}
    for index, (role, path) in enumerate(entries):
        field = f"control.tokens[{index}].token_file"
        token = read_token(path, field, allowed)
        if token in tokens:
            raise SecretFileError(f"{field} {path}: holds the same token as an earlier entry; every token is unique")
        tokens[token] = _role(role, field)
    return tokens


def _role(role: str, field: str) -> Role:
    if role == "viewer":
        return "viewer"
    if role == "operator":
        return "operator"
    if role == "admin":
        return "admin"
    raise ConfigError(f"{field}: unknown role {role!r}")


def settings_tokens(settings: AgentSettings) -> dict[str, Role]:
    return load_tokens(
        [(t.role, t.token_file) for t in settings.control.tokens], trusted_owners(settings.daemon.service_user)
    )


# --- all of them --------------------------------------------------------------------------------


def check_all(settings: AgentSettings) -> None:
    """Read and check every secret file the configuration names (``config check``, ``run``, reload).

    The key files are checked even when ``backup.encryption`` is off: they are still what restores and
    validations of older, encrypted backups need.
    """
    load_keyring(settings)
    check_password_files(settings)
    settings_tokens(settings)
    peer_token(settings)
    webhook_token(settings)


def peer_token(settings: AgentSettings) -> str | None:
    """The token this agent presents to its DR peer (``dr.peer_token_file``), checked like every token."""
    dr = settings.dr
    if not dr.enabled or dr.peer_token_file is None:
        return None
    return read_token(dr.peer_token_file, "dr.peer_token_file", trusted_owners(settings.daemon.service_user))


def webhook_token(settings: AgentSettings) -> str | None:
    """The bearer token for the alert webhook (``notify.webhook_token_file``), checked like every token."""
    path = settings.notify.webhook_token_file
    if path is None:
        return None
    return read_token(path, "notify.webhook_token_file", trusted_owners(settings.daemon.service_user))
