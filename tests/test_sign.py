"""Signed checkpoints (issue 32): ``shardckpt sign``, ``verify --public-key``, and a manager with
``trusted_keys`` that refuses what a trusted key did not sign, before any byte reaches the
user's tensors; the signature verifies with model-signing's own CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import shardckpt
from shardckpt.cli.main import main
from shardckpt.sign import SIGNATURE_NAME, SignatureError, UnsignedCheckpointError
from shardckpt.storage import step_dirname


def make_keys(where: Path, name: str = "key") -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / f"{name}.pem", where / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(private), str(public)


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 8), value), "b": torch.arange(6.0) + value}


def save(root: str, step: int, value: float) -> None:
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(step, state(value))


def test_a_replaced_step_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = make_keys(tmp_path)
    root, other = str(tmp_path / "run"), str(tmp_path / "attacker")
    save(root, 5, 1.0)
    save(other, 5, 2.0)  # another valid checkpoint of the same structure
    assert main(["sign", root, "--step", "5", "--key", key]) == 0
    assert main(["verify", root, "--step", "5", "--public-key", pub]) == 0

    step_dir = tmp_path / "run" / step_dirname(5)
    signature = (step_dir / SIGNATURE_NAME).read_bytes()
    shutil.rmtree(step_dir)  # replaced wholesale, the signature file kept
    shutil.copytree(tmp_path / "attacker" / step_dirname(5), step_dir)
    (step_dir / SIGNATURE_NAME).write_bytes(signature)

    assert main(["verify", root, "--step", "5"]) == 0  # every XXH3 checks: not tampering-proof
    capsys.readouterr()
    assert main(["verify", root, "--step", "5", "--public-key", pub, "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    check = next(c for c in doc["checks"] if c["name"] == "signature")
    assert not check["ok"] and "manifest.json: SHA-256 differs" in check["detail"]

    user = state(7.0)
    with shardckpt.CheckpointManager(root, trusted_keys=[pub]) as mgr:
        with pytest.raises(SignatureError, match="refusing to load step 5"):
            mgr.load(user)
        with pytest.raises(SignatureError):
            mgr.load(user, step=5)
    assert torch.equal(user["w"], torch.full((4, 8), 7.0))  # untouched
    assert torch.equal(user["b"], torch.arange(6.0) + 7.0)

    unsigned = str(tmp_path / "unsigned")
    save(unsigned, 3, 3.0)
    with shardckpt.CheckpointManager(unsigned, trusted_keys=[pub]) as mgr:
        with pytest.raises(UnsignedCheckpointError, match="no signed checkpoint to load"):
            mgr.load(user)
        with pytest.raises(UnsignedCheckpointError, match="not signed"):
            mgr.load(user, step=3)
    assert torch.equal(user["w"], torch.full((4, 8), 7.0))

    assert main(["sign", other, "--step", "5", "--key", key]) == 0
    with shardckpt.CheckpointManager(other, trusted_keys=[pub]) as mgr:
        assert mgr.load(user) == 5
        assert mgr.last_load_profile["signature_bytes_hashed"] > 0
    assert torch.equal(user["w"], torch.full((4, 8), 2.0))


def test_newest_signed_step_is_loaded_warning_about_newer_unsigned(tmp_path: Path) -> None:
    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    save(root, 1, 1.0)
    assert main(["sign", root, "--step", "1", "--key", key]) == 0
    save(root, 2, 2.0)
    user = state(0.0)
    with shardckpt.CheckpointManager(root, trusted_keys=[pub]) as mgr:
        with pytest.warns(UserWarning, match="skipping newer unsigned step"):
            assert mgr.load(user) == 1
    assert torch.equal(user["w"], torch.full((4, 8), 1.0))


def test_a_key_that_did_not_sign_is_refused(tmp_path: Path) -> None:
    key, _ = make_keys(tmp_path, "signer")
    _, stranger = make_keys(tmp_path, "stranger")
    root = str(tmp_path / "run")
    save(root, 1, 1.0)
    assert main(["sign", root, "--step", "1", "--key", key]) == 0
    assert main(["verify", root, "--step", "1", "--public-key", stranger]) == 2
    with shardckpt.CheckpointManager(root, trusted_keys=[stranger]) as mgr:
        with pytest.raises(SignatureError, match="does not verify with any trusted key"):
            mgr.load(state(0.0))


def test_sign_and_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    save(root, 1, 1.0)
    assert main(["sign", root, "--step", "1", "--key", pub]) == 64  # not a private key
    assert main(["sign", root, "--step", "1", "--key", key, "--json"]) == 0
    capsys.readouterr()
    assert main(["log", root, "--json"]) == 0
    events = [(r["event"], r["step"]) for r in json.loads(capsys.readouterr().out)]
    assert events == [("commit", 1), ("sign", 1)]


def test_model_signing_cli_verifies_a_signed_step(tmp_path: Path) -> None:
    """Interoperability: the real ``model_signing`` package (1.1.1) checks our signature."""
    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    save(root, 4, 4.0)
    assert main(["tag", root, "--step", "4", "--add", "release"]) == 0  # tags.json: ignored
    assert main(["sign", root, "--step", "4", "--key", key]) == 0
    step_dir = tmp_path / "run" / step_dirname(4)
    exe = os.path.join(os.path.dirname(sys.executable), "model_signing")
    cmd = [exe, "verify", "key", str(step_dir), "--signature", str(step_dir / SIGNATURE_NAME),
           "--public_key", pub]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verification succeeded" in done.stdout
    shard = next(p for p in step_dir.iterdir() if p.suffix == ".shard")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Hash mismatch" in done.stderr


def test_a_step_signed_by_model_signing_checks_with_shardckpt(tmp_path: Path) -> None:
    """The other way round: model-signing's own ``key`` signer writes the bundle, shardckpt's
    ``verify --public-key`` accepts it (the same format, read by both)."""
    import model_signing

    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    save(root, 2, 2.0)
    step_dir = tmp_path / "run" / step_dirname(2)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])
    ).sign(step_dir, step_dir / SIGNATURE_NAME)
    assert main(["verify", root, "--step", "2", "--public-key", pub]) == 0
    (step_dir / "manifest.json").write_bytes((step_dir / "manifest.json").read_bytes() + b" ")
    assert main(["verify", root, "--step", "2", "--public-key", pub, "--no-record"]) == 2
