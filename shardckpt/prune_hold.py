"""What a prune keeps whole because kept steps reference it, or may (issue 30, finding F1).

A step directory whose manifest is missing or damaged is, by its own state, an unfinished save
(reaped after the grace period) or a corrupt step. When the manifests of kept steps reference
its files, it is neither: it is the base of those steps, whose manifest was lost, and
``repair`` from a replica restores it. The prune never reaps such a directory, keeps all of
its files (the unreferenced ones too: nothing is judged from a directory whose manifest
cannot be read), and reports it in ``PruneReport.kept_dirs`` with why; so too a directory that
a save moved aside as corrupt (``step-N.corrupt-<utc>``) while kept steps reference step N. So
it does with every directory and dropped step below a step whose corrupt manifest may reference
it (:func:`.prune_refs.opaque_reason`). Never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .catalog import ASIDE_DIR
from .prune_refs import Referenced
from .storage import step_dirname
from .storage.location import STEP_DIR


def hold_dirs(referenced: Referenced, dirs: Iterable[str], corrupt: Mapping[int, str]
              ) -> dict[str, str]:
    """Directory -> why it stays whole, among the uncommitted ``dirs`` (and directories moved
    aside as corrupt: their files may be the ones referenced) and the ``corrupt`` steps."""
    held: dict[str, str] = {}
    for d in dirs:
        aside = ASIDE_DIR.fullmatch(d)
        if STEP_DIR.fullmatch(d) or aside:
            step = int(aside.group(1) if aside else d[len("step-"):])
            why = referenced.hold(step, "" if aside else "missing")
            if why is not None:
                held[d] = f"moved aside as corrupt, step {step} {why}" if aside else why
    for step in corrupt:
        why = referenced.hold(step, "damaged")
        if why is not None:
            held[step_dirname(step)] = why
    return held


def hold_steps(referenced: Referenced, dropped: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """The dropped committed steps that must stay whole (step -> reasons): a corrupt later
    manifest may reference any of their files."""
    out: dict[int, tuple[str, ...]] = {}
    for step in dropped:
        why = referenced.unknown(step)
        if why is not None:
            out[step] = (why,)
    return out


def unheld(skipped: Mapping[str, str], held: Mapping[str, str]) -> dict[str, str]:
    """``skipped`` without the directories reported as held."""
    return {d: why for d, why in skipped.items() if d not in held}


__all__ = ["hold_dirs", "hold_steps", "unheld"]
