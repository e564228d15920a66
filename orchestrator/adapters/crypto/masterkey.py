"""The master key: wraps every secret the catalog stores (tenant passwords now,
tenant private keys later). It comes from a key file (mode 0600) or an
environment variable, never from the config file or argv.

Ciphertext format: ``v1:<key id>:<base64(nonce || AES-256-GCM ciphertext)>``.
The key id lets rotation tell which key wrapped a value, and makes a wrong key
a clear error instead of a garbled secret. The associated data binds each
ciphertext to its purpose (e.g. ``tenant:acme:password``), so a value copied
onto another row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator.config import MasterKeySource
from orchestrator.domain.errors import FIELD, Conflict, InvalidInput, MasterKeyError, first_line

KEY_BYTES = 32


@dataclass(frozen=True, repr=False)
class MasterKey:
    key: bytes

    def __repr__(self) -> str:  # never print key material by accident
        return f"MasterKey(id={self.key_id})"

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"tenantctl-master-key-id:" + self.key).hexdigest()[:16]

    def wrap(self, plaintext: bytes, context: str) -> str:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self.key).encrypt(nonce, plaintext, context.encode())
        return f"v1:{self.key_id}:{base64.b64encode(nonce + ct).decode()}"

    def unwrap(self, wrapped: str, context: str) -> bytes:
        try:
            version, key_id, payload = wrapped.split(":", 2)
            blob = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            raise MasterKeyError(f"stored secret for {context} is malformed") from None
        if version != "v1":
            raise MasterKeyError(f"stored secret for {context} has unknown format {version!r}")
        if key_id != self.key_id:
            raise MasterKeyError(
                f"secret for {context} was wrapped by master key {key_id}, "
                f"but the configured master key is {self.key_id}"
            )
        try:
            return AESGCM(self.key).decrypt(blob[:12], blob[12:], context.encode())
        except InvalidTag:
            raise MasterKeyError(f"secret for {context} failed authentication "
                                 "(tampered, or wrapped for another purpose)") from None


def generate_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"


def write_key_file(path: Path) -> None:
    """Create a new key file with mode 0600; refuses to overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_key_text())


def create_private_file(path: Path, *, force: bool = False) -> TextIO:
    """A new file only its owner can read (created with mode 0600, never widened
    for a moment): for a secret written out. An existing file is refused unless
    ``force``, which replaces it (unlinked first: its old mode does not carry over)."""
    try:
        if force and (path.is_symlink() or path.exists()):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} already exists; {FIELD} replaces it", field="force") from None
    except OSError as exc:
        raise InvalidInput(f"cannot create {path}: {exc.strerror}") from None
    return os.fdopen(fd, "w")


def _decode(text: str, where: str) -> MasterKey:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise MasterKeyError(f"master key in {where} is not base64") from None
    if len(key) != KEY_BYTES:
        raise MasterKeyError(f"master key in {where} must be {KEY_BYTES} bytes, got {len(key)}")
    return MasterKey(key)


def _kms_client(source: MasterKeySource) -> Any:
    import boto3  # start-up: boto3 (~0.3 s) only for a KMS-held key

    return boto3.client("kms", region_name=source.kms_region,
                        endpoint_url=source.kms_endpoint_url)


def write_kms_data_key(source: MasterKeySource, path: Path) -> None:
    """Have KMS make a new 256-bit data key; keep only its encrypted form (0600)."""
    try:
        blob = _kms_client(source).generate_data_key(
            KeyId=source.kms_key_id, KeySpec="AES_256")["CiphertextBlob"]
    except Exception as exc:
        raise MasterKeyError(f"KMS could not make a data key with {source.kms_key_id}: "
                             f"{first_line(exc)}") from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(blob).decode() + "\n")


def _load_kms(source: MasterKeySource) -> MasterKey:
    assert source.kms_data_key_file is not None
    try:
        blob = base64.b64decode(source.kms_data_key_file.read_text().strip(), validate=True)
    except FileNotFoundError:
        raise MasterKeyError(f"KMS data key file {source.kms_data_key_file} does not "
                             "exist") from None
    except (binascii.Error, ValueError):
        raise MasterKeyError(f"KMS data key file {source.kms_data_key_file} is not "
                             "base64") from None
    try:
        plain = _kms_client(source).decrypt(CiphertextBlob=blob,
                                            KeyId=source.kms_key_id)["Plaintext"]
    except Exception as exc:
        raise MasterKeyError(f"KMS could not decrypt the master key with "
                             f"{source.kms_key_id}: "
                             f"{first_line(exc)}") from None
    if len(plain) != KEY_BYTES:
        raise MasterKeyError(f"KMS data key must be {KEY_BYTES} bytes, got {len(plain)}")
    return MasterKey(plain)


def load_master_key(source: MasterKeySource) -> MasterKey:
    if source.kms_key_id:
        return _load_kms(source)
    if source.env:
        text = os.environ.get(source.env)
        if not text:
            raise MasterKeyError(f"master key environment variable ${source.env} is not set")
        return _decode(text, f"${source.env}")
    assert source.file is not None
    try:
        st = source.file.stat()
        text = source.file.read_text()
    except FileNotFoundError:
        raise MasterKeyError(f"master key file {source.file} does not exist") from None
    except PermissionError:
        raise MasterKeyError(f"master key file {source.file} is not readable") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(
            f"master key file {source.file} is readable by others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    return _decode(text, str(source.file))
