"""AWS KMS as a master key: ``GenerateDataKey`` for each backup, ``Decrypt`` to open one, ``Encrypt`` to rotate.

Envelope encryption keeps the master key inside KMS: the agent asks KMS for a fresh 256-bit data key per
backup, encrypts the stream with the plaintext half exactly as it would with a key file's data key, and stores
only the ``CiphertextBlob`` (base64) in the manifest, with ``wrap = "aws-kms"``. Every call carries the
encryption context ``{"kybdr:backup_id": <id>}``: KMS binds the blob to it, so a wrapped key moved to another
backup's manifest fails to decrypt (``InvalidCiphertextException``), as the file wrap's associated data does;
and the backup id appears in CloudTrail's record of every Decrypt, which says which backup was opened.

The 16-byte key id a backup records (manifest ``key_id`` and the stream header) is the KMS key's own id:
the 128 bits of its UUID, or of the 32 hex digits after ``mrk-`` of a multi-Region key. A multi-Region key
and its replica in the DR region share that id and their key material, so an agent in the DR region,
configured with the replica's ARN (terraform's ``dr_region_agent_config``), finds the same key id in every
manifest and its ``Decrypt`` there opens backups made in the primary region, with the primary region gone.
No lookup is needed for an ARN or a key id; an alias is resolved once with ``DescribeKey`` (which the
terraform role does not grant: configure the key ARN that terraform outputs).

The client: one aiobotocore KMS client per key, opened on first use and closed by ``aclose`` (the
composition root closes it with the stores). Its endpoint is botocore's own choice, which honours
``AWS_ENDPOINT_URL_KMS`` and ``AWS_ENDPOINT_URL`` (how the tests reach moto); credentials come from the
standard chain. Timeouts are short and retries bounded (botocore's standard mode, which knows KMS's
throttling codes), and every call has an overall deadline, so a KMS outage fails a backup in seconds with
one line naming the key and region, instead of hanging it. No plaintext ever reaches a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import anyio

from kybdr_agent.backup.keys import KeyMaterialError, NewDataKey, data_key_encryption
from kybdr_agent.backup.streamfmt import DATA_KEY_SIZE, KEY_ID_SIZE
from kybdr_agent.errors import KeyUnavailable

KMS_WRAP: Final = "aws-kms"
CONTEXT_KEY: Final = "kybdr:backup_id"
_ARN: Final = re.compile(r"^arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):[0-9]{12}:(?P<kind>key|alias)/(?P<name>.+)$")
_MRK: Final = re.compile(r"^mrk-(?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F-]{36})$")
# KMS's answers to "this blob is not for this key, this context or this account": the wrapped key cannot be
# opened with what we asked for, which is a statement about the key, not an outage.
_REFUSALS: Final = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "AccessDeniedException", "InvalidKeyUsageException"}
)


class KmsUnavailable(KeyUnavailable):
    """KMS could not be asked (network, credentials, throttling past the retries, a disabled key)."""


def arn_region(key_ref: str) -> str | None:
    """The region named in a key or alias ARN; None for a bare key id or alias name."""
    match = _ARN.match(key_ref)
    return match["region"] if match else None


def key_id_part(key_ref: str) -> str | None:
    """The KMS key id a reference names (``mrk-…`` or a UUID), or None for an alias, which needs a lookup."""
    match = _ARN.match(key_ref)
    if match:
        return match["name"] if match["kind"] == "key" else None
    return None if key_ref.startswith("alias/") else key_ref


def derive_key_id(kms_key_id: str) -> bytes:
    """The 16-byte key id of a KMS key: its UUID's bytes, or the hex after ``mrk-`` (the same in every region a
    multi-Region key is replicated to). Any other form (none exists today) is hashed down to 16 bytes."""
    mrk = _MRK.match(kms_key_id)
    digits = mrk["hex"].replace("-", "") if mrk else None
    if digits is None:
        try:
            return uuid.UUID(kms_key_id).bytes
        except ValueError:
            return hashlib.sha256(b"kybdr kms key id v1:" + kms_key_id.encode()).digest()[:KEY_ID_SIZE]
    if len(digits) == 2 * KEY_ID_SIZE:
        return bytes.fromhex(digits)
    return hashlib.sha256(b"kybdr kms key id v1:" + kms_key_id.encode()).digest()[:KEY_ID_SIZE]


@dataclass(frozen=True)
class KmsOptions:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    attempts: int = 3
    deadline: float = 60.0  # per operation, every attempt and backoff included


class KmsKey:
    """One KMS key (``encryption.kms_key_id``) as a master key of the ring; see the module docstring."""

    wrap_algorithm: ClassVar[str] = KMS_WRAP

    def __init__(self, key_ref: str, *, region: str | None, options: KmsOptions | None = None) -> None:
        self.key_ref = key_ref
        self.region = region or arn_region(key_ref)
        self.options = options or KmsOptions()
        part = key_id_part(key_ref)
        self._key_id: bytes | None = derive_key_id(part) if part else None
        self._client: Any = None
        self._exit: AsyncExitStack | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"KmsKey({self.key_ref!r}, region={self.region!r})"

    @property
    def label(self) -> str:
        return f"AWS KMS key {self.key_ref}" + (f" ({self.region})" if self.region else "")

    @property
    def known_key_id(self) -> bytes | None:
        return self._key_id

    async def resolve_key_id(self) -> bytes:
        if self._key_id is None:
            answer = await self._call("DescribeKey", "describe_key", KeyId=self.key_ref)
            self._learn(str(answer["KeyMetadata"]["KeyId"]))
        assert self._key_id is not None
        return self._key_id

    async def generate(self, backup_id: str) -> NewDataKey:
        answer = await self._call(
            "GenerateDataKey",
            "generate_data_key",
            KeyId=self.key_ref,
            KeySpec="AES_256",
            EncryptionContext=_context(backup_id),
        )
        plaintext = bytes(answer["Plaintext"])
        if len(plaintext) != DATA_KEY_SIZE:
            raise KmsUnavailable(f"{self.label}: GenerateDataKey returned a data key of the wrong length")
        key_id = self._learn(str(answer["KeyId"]))
        wrapped = base64.b64encode(bytes(answer["CiphertextBlob"])).decode("ascii")
        return NewDataKey(plaintext, data_key_encryption(key_id, KMS_WRAP, wrapped))

    async def wrap_data_key(self, data_key: bytes, backup_id: str) -> tuple[bytes, str]:
        """Encrypt an existing data key (rotation): needs ``kms:Encrypt`` on the key."""
        answer = await self._call(
            "Encrypt", "encrypt", KeyId=self.key_ref, Plaintext=data_key, EncryptionContext=_context(backup_id)
        )
        key_id = self._learn(str(answer["KeyId"]))
        return key_id, base64.b64encode(bytes(answer["CiphertextBlob"])).decode("ascii")

    async def unwrap_data_key(self, wrapped: str, backup_id: str) -> bytes:
        try:
            blob = base64.b64decode(wrapped, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyMaterialError("the manifest's wrapped data key is not valid base64") from exc
        answer = await self._call(
            "Decrypt", "decrypt", KeyId=self.key_ref, CiphertextBlob=blob, EncryptionContext=_context(backup_id)
        )
        self._learn(str(answer["KeyId"]))
        plaintext = bytes(answer["Plaintext"])
        if len(plaintext) != DATA_KEY_SIZE:
            raise KeyMaterialError("unwrapped data key has the wrong length")
        return plaintext

    async def aclose(self) -> None:
        stack, self._exit, self._client = self._exit, None, None
        if stack is not None:
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    # --- the client -----------------------------------------------------------------------------

    def _learn(self, arn_or_id: str) -> bytes:
        """The key id of the key KMS says it used (an ARN in every answer); for an alias, this resolves it."""
        part = key_id_part(arn_or_id) or arn_or_id
        key_id = derive_key_id(part)
        if self._key_id is None:
            self._key_id = key_id
        return key_id

    async def _open(self) -> Any:
        async with self._lock:
            if self._client is None:
                # Imported here: aiobotocore costs ~0.2 s and ~30 MiB, which a key-file agent never needs.
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                config = AioConfig(
                    connect_timeout=self.options.connect_timeout,
                    read_timeout=self.options.read_timeout,
                    retries={"mode": "standard", "total_max_attempts": self.options.attempts},
                )
                stack = AsyncExitStack()
                try:
                    self._client = await stack.enter_async_context(
                        get_session().create_client("kms", region_name=self.region, config=config)
                    )
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await stack.aclose()
                    raise
                self._exit = stack
            return self._client

    async def _call(self, operation: str, method: str, **kwargs: Any) -> Any:
        import aiohttp
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{self.label}: {operation}"
        try:
            with anyio.fail_after(self.options.deadline):
                client = await self._open()
                return await getattr(client, method)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "error"))
            message = " ".join(str(error.get("Message", "")).split())[:300]
            said = f"{code}: {message}" if message else code
            if operation == "Decrypt" and code in _REFUSALS:
                raise KeyMaterialError(
                    f"{where} refused the wrapped data key ({said}): it was wrapped by another KMS key or for "
                    "another backup, the manifest was tampered with, or this role may not use the key"
                ) from None
            raise KmsUnavailable(f"{where} failed: {said}") from None
        except TimeoutError:
            raise KmsUnavailable(f"{where} did not answer within {self.options.deadline:g} s") from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise KmsUnavailable(f"{where} failed: {text}") from None


def _context(backup_id: str) -> dict[str, str]:
    return {CONTEXT_KEY: backup_id}
