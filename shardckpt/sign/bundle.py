"""The signature format: OpenSSF model-signing's v1.0 payload in a DSSE envelope in a Sigstore
bundle, signed with an elliptic-curve key (ECDSA; P-256 with SHA-256, as model-signing's
``key`` signer does; P-384 and P-521 verify too).

- The payload is an in-toto Statement v1: ``subject`` is one descriptor (the step directory's
  name, and the SHA-256 over the concatenated raw digests of the resources in name order),
  ``predicateType`` is ``https://model_signing/signature/v1.0``, and ``predicate`` holds
  ``serialization`` (``method: files``, ``hash_type: sha256``, ``allow_symlinks: false``,
  ``ignore_paths``: the files of the step directory that the signature does not cover) and
  ``resources``: ``{"name", "algorithm": "sha256", "digest": hex}`` per file, sorted by name.
- The envelope's signature is over DSSE's PAE(``application/vnd.in-toto+json``, payload).
- The bundle (media type ``application/vnd.dev.sigstore.bundle.v0.3+json``) names the key by
  ``verificationMaterial.publicKey.hint``: the hex SHA-256 of the public key's PEM
  (SubjectPublicKeyInfo), and has no transparency-log entry.

Needs ``cryptography`` (``pip install shardckpt[sign]``). Never imports torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CorruptCheckpointError

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
MAX_BUNDLE_BYTES = 64 << 20


class SignatureError(CorruptCheckpointError):
    """A signature is missing, malformed, made by no trusted key, or does not match the files.
    The message names the step directory (and file)."""


class UnsignedCheckpointError(SignatureError):
    """A step has no signature, and trusted keys are required."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:  # pragma: no cover - the [sign] extra is missing
        raise ImportError("signing needs the 'cryptography' package: "
                          "pip install 'shardckpt[sign]'") from None
    return hashes, serialization, ec


def _hash_for(key: Any) -> Any:
    hashes, _, _ = _crypto()
    size = key.curve.key_size
    if size == 256:
        return hashes.SHA256()
    if size == 384:
        return hashes.SHA384()
    if size == 521:
        return hashes.SHA512()
    raise ValueError(f"unsupported curve {key.curve.name}")


def _check_curve(key: Any, path: str) -> None:
    _, _, ec = _crypto()
    pub = key if isinstance(key, ec.EllipticCurvePublicKey) else None
    if pub is None and isinstance(key, ec.EllipticCurvePrivateKey):
        pub = key.public_key()
    if pub is None or pub.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ValueError(f"{path}: not an ECDSA key on P-256, P-384 or P-521 (what "
                         "model-signing accepts)")


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> Any:
    """A PEM private key; ``ValueError`` naming the file if it is not a supported EC key."""
    _, serialization, _ = _crypto()
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.fspath(path)}: not a PEM private key: {exc}") from None
    _check_curve(key, os.fspath(path))
    return key


def load_public_key(path: str | os.PathLike[str]) -> Any:
    """A PEM public key; ``ValueError`` naming the file if it is not a supported EC key."""
    _, serialization, _ = _crypto()
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.fspath(path)}: not a PEM public key: {exc}") from None
    _check_curve(key, os.fspath(path))
    return key


def key_hint(public_key: Any) -> str:
    """model-signing's key identifier: the hex SHA-256 of the SubjectPublicKeyInfo PEM."""
    _, serialization, _ = _crypto()
    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of an in-toto payload."""
    return b" ".join([f"DSSEv1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(payload)}".encode(),
                      payload])


def statement(name: str, digests: Mapping[str, str], ignore_paths: Sequence[str]
              ) -> dict[str, Any]:
    """The in-toto statement over ``digests`` (name -> hex SHA-256)."""
    resources = [{"name": n, "algorithm": "sha256", "digest": digests[n]}
                 for n in sorted(digests)]
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": root}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {"serialization": {"method": "files", "hash_type": "sha256",
                                            "allow_symlinks": False,
                                            "ignore_paths": sorted(ignore_paths)},
                          "resources": resources}}


def make_bundle(private_key: Any, stmt: Mapping[str, Any]) -> bytes:
    """The Sigstore bundle (JSON bytes) signing ``stmt`` with ``private_key``."""
    _, _, ec = _crypto()
    payload = json.dumps(stmt, indent=2, sort_keys=True).encode()
    sig = private_key.sign(pae(payload), ec.ECDSA(_hash_for(private_key.public_key())))
    bundle = {"mediaType": BUNDLE_MEDIA_TYPE,
              "verificationMaterial": {"publicKey": {"hint": key_hint(private_key.public_key())},
                                       "tlogEntries": []},
              "dsseEnvelope": {"payload": base64.b64encode(payload).decode(),
                               "payloadType": PAYLOAD_TYPE,
                               "signatures": [{"sig": base64.b64encode(sig).decode(),
                                               "keyid": ""}]}}
    return json.dumps(bundle, indent=2).encode() + b"\n"


def open_bundle(data: bytes, public_keys: Sequence[Any], where: str) -> dict[str, str]:
    """Check a bundle against ``public_keys`` (any one may have signed it); returns the signed
    digests (name -> hex SHA-256). ``SignatureError`` naming ``where`` otherwise."""
    from cryptography.exceptions import InvalidSignature

    _, _, ec = _crypto()
    try:
        doc = json.loads(data)
        if doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
            raise ValueError(f"media type {doc.get('mediaType')!r}")
        env = doc["dsseEnvelope"]
        if env.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError(f"payload type {env.get('payloadType')!r}")
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"]]
        hint = ((doc.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"{where}: not a Sigstore bundle of a DSSE envelope: {exc}") \
            from None
    good = False
    for key in public_keys:
        if hint and hint != key_hint(key):
            continue
        for sig in sigs:
            try:
                key.verify(sig, pae(payload), ec.ECDSA(_hash_for(key)))
                good = True
                break
            except InvalidSignature:
                continue
        if good:
            break
    if not good:
        raise SignatureError(f"{where}: the signature does not verify with any trusted key")
    return _digests(payload, where)


def _digests(payload: bytes, where: str) -> dict[str, str]:
    try:
        stmt = json.loads(payload)
        if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
            raise ValueError("not a model-signing v1.0 in-toto statement")
        out: dict[str, str] = {}
        for r in stmt["predicate"]["resources"]:
            if r.get("algorithm") != "sha256" or r["name"] in out:
                raise ValueError(f"resource {r.get('name')!r}: sha256 once each")
            out[str(r["name"])] = str(r["digest"]).lower()
        root = hashlib.sha256(b"".join(bytes.fromhex(out[n]) for n in sorted(out))).hexdigest()
        if stmt["subject"][0]["digest"]["sha256"] != root:
            raise ValueError("the subject digest does not match the resources")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SignatureError(f"{where}: signed payload is malformed: {exc}") from None
    return out


__all__ = ["SignatureError", "UnsignedCheckpointError", "key_hint", "load_private_key",
           "load_public_key", "make_bundle", "open_bundle", "statement"]
