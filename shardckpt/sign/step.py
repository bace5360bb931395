"""Signing a step, and checking a step against its signature (no torch).

A step's signature is ``step-NNNNNNNNNN/signature.sigstore.json`` (see :mod:`.bundle`). It
covers the SHA-256 of ``manifest.json`` and of every file the manifest lists; the resource
names are the file names in the step directory, so that the directory of a plain local step
verifies with model-signing's own CLI (``model_signing verify key STEP_DIR --signature
STEP_DIR/signature.sigstore.json --public_key PUB.pem``). Files of the step directory that are
not part of the checkpoint (the signature itself, ``tags.json``, ``verification.json``) are
listed in the statement's ``ignore_paths``. A file another step holds (a reference of an
incremental save) is one more resource named ``../step-MMMMMMMMMM/FILE``: a list addition to
the same payload (model-signing's CLI cannot verify those: it hashes one directory).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..catalog import read_manifest
from ..format import manifest as M
from ..format.refs import references
from ..storage import Location, step_dirname
from .bundle import (
    MAX_BUNDLE_BYTES,
    SignatureError,
    UnsignedCheckpointError,
    load_private_key,
    make_bundle,
    open_bundle,
    statement,
)

SIGNATURE_NAME = "signature.sigstore.json"
NOT_COVERED = (SIGNATURE_NAME, "tags.json", "verification.json")
HASH_BLOCK = 8 << 20


def covered_files(manifest: M.Manifest) -> dict[str, str]:
    """Resource name -> path relative to the root, of every file the signature covers."""
    d = step_dirname(manifest.step)
    names = [M.MANIFEST_NAME, *sorted(manifest.files)]
    out = {n: f"{d}/{n}" for n in names}
    for ref in references(manifest.extra, manifest.step):  # incremental saves
        rd = step_dirname(ref.step)
        out[f"../{rd}/{ref.file}"] = f"{rd}/{ref.file}"
    return out


def sha256_of(location: Location, relpath: str) -> tuple[str, int]:
    """The hex SHA-256 of a whole file, read in blocks; and its size."""
    h = hashlib.sha256()
    offset = 0
    while True:
        block = location.read_range(relpath, offset, HASH_BLOCK)
        if not block:
            break
        h.update(block)
        offset += len(block)
        if len(block) < HASH_BLOCK:
            break
    return h.hexdigest(), offset


def step_digests(location: Location, manifest: M.Manifest) -> dict[str, str]:
    return {name: sha256_of(location, rel)[0] for name, rel in covered_files(manifest).items()}


def sign_step(location: Location, step: int, key_path: str | os.PathLike[str],
              password: bytes | None = None) -> tuple[str, int]:
    """Write the step's signature (replacing an earlier one); returns its path and the bytes
    hashed. Reads every covered file once."""
    key = load_private_key(key_path, password)
    manifest = read_manifest(location, step)
    files = covered_files(manifest)
    digests: dict[str, str] = {}
    nbytes = 0
    for name, rel in files.items():
        digests[name], size = sha256_of(location, rel)
        nbytes += size
    stmt = statement(step_dirname(step), digests, NOT_COVERED)
    rel = f"{step_dirname(step)}/{SIGNATURE_NAME}"
    location.write_atomic(rel, make_bundle(key, stmt))
    return rel, nbytes


@dataclass(frozen=True)
class SignatureCheck:
    """What checking one step against its signature found: ``ok``, and the problems."""

    step: int
    ok: bool
    signed: bool
    problems: tuple[str, ...]
    nbytes: int = 0

    def detail(self) -> str:
        return "signature valid; every file matches" if self.ok else "; ".join(self.problems)


def signed_digests(location: Location, step: int, public_keys: Sequence[Any]) -> dict[str, str]:
    """The digests a trusted key signed for ``step``: ``UnsignedCheckpointError`` if there is
    no signature, ``SignatureError`` if it does not verify."""
    rel = f"{step_dirname(step)}/{SIGNATURE_NAME}"
    where = f"{location.display}/{rel}"
    try:
        data = location.read_file(rel, MAX_BUNDLE_BYTES)
    except FileNotFoundError:
        raise UnsignedCheckpointError(f"{location.display}/{step_dirname(step)}: not signed "
                                      f"(no {SIGNATURE_NAME})") from None
    return open_bundle(data, public_keys, where)


def check_step(location: Location, step: int, public_keys: Sequence[Any]) -> SignatureCheck:
    """Verify the signature of ``step`` with ``public_keys``, then hash every file it covers
    (and every file the manifest lists now) and compare. Never raises for what it finds."""
    try:
        signed = signed_digests(location, step, public_keys)
    except UnsignedCheckpointError as exc:
        return SignatureCheck(step, False, False, (str(exc),))
    except SignatureError as exc:
        return SignatureCheck(step, False, True, (str(exc),))
    problems: list[str] = []
    d = step_dirname(step)
    nbytes = 0
    wanted = dict(signed)
    try:
        manifest = read_manifest(location, step)
        now = covered_files(manifest)
        for name in sorted(set(now) - set(signed)):
            problems.append(f"{location.display}/{now[name]}: not covered by the signature")
    except Exception as exc:  # a corrupt manifest is also a hash mismatch below
        problems.append(f"{location.display}/{d}/{M.MANIFEST_NAME}: {exc}")
    for name in sorted(wanted):
        rel = f"{d}/{name}" if not name.startswith("../") else name[3:]
        try:
            digest, size = sha256_of(location, rel)
        except FileNotFoundError:
            problems.append(f"{location.display}/{rel}: missing")
            continue
        except Exception as exc:
            problems.append(f"{location.display}/{rel}: unreadable: {exc}")
            continue
        nbytes += size
        if digest != wanted[name]:
            problems.append(f"{location.display}/{rel}: SHA-256 differs from the signed one")
    return SignatureCheck(step, not problems, True, tuple(problems), nbytes)


__all__ = ["NOT_COVERED", "SIGNATURE_NAME", "SignatureCheck", "check_step", "covered_files",
           "sha256_of", "sign_step", "signed_digests"]
