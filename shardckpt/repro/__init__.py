"""Reproducibility: RNG state, determinism settings, provenance records, data-loader position.

Pure helpers with no I/O of checkpoints: the manager stores what they return in the state and the
manifest. ``rng`` and ``data`` hold per-rank state; ``provenance`` is local to the calling rank.
"""

from ..redact import REDACTED, is_secret_name, redact_argv, redact_tree, scrub_text
from .data import SamplerPosition, is_stateful_dataloader
from .determinism import determinism_record, make_generator, seed_worker, set_determinism
from .distributions import installed_distributions
from .gitstate import git_state
from .provenance import allowed_environment, collect_provenance, describe_mesh, host_record
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "REDACTED",
    "SamplerPosition",
    "allowed_environment",
    "capture_rng_state",
    "collect_provenance",
    "describe_mesh",
    "determinism_record",
    "git_state",
    "host_record",
    "installed_distributions",
    "is_secret_name",
    "is_stateful_dataloader",
    "make_generator",
    "redact_argv",
    "redact_tree",
    "restore_rng_state",
    "scrub_text",
    "seed_worker",
    "set_determinism",
]
