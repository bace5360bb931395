"""Signed checkpoints: model-signing's payload in a Sigstore bundle (no torch here; the
manager's trusted load is :mod:`.trusted`)."""

from .bundle import SignatureError, UnsignedCheckpointError, load_private_key, load_public_key
from .step import SIGNATURE_NAME, SignatureCheck, check_step, sign_step

__all__ = ["SIGNATURE_NAME", "SignatureCheck", "SignatureError", "UnsignedCheckpointError",
           "check_step", "load_private_key", "load_public_key", "sign_step"]
