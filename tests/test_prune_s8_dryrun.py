"""A dry run of prune reports exactly what the real run does, retired steps included (issue 30
trial, item 2): ``PruneReport.retired``, the ``retired`` list of ``--json`` and the text."""

from __future__ import annotations

import json

from incremental_helpers import lora_state

import shardckpt
from shardckpt.cli.main import main
from shardckpt.prune import prune_location
from shardckpt.storage import open_location


def _root(tmp_path) -> str:
    root = str(tmp_path / "root")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, lora_state(s))
    return root


def _comparable(doc: dict) -> dict:
    return {k: doc.get(k) for k in ("kept", "deleted", "retired", "reaped")}


def test_dry_run_report_matches_real_run(tmp_path):
    root = _root(tmp_path)
    policy = shardckpt.RetentionPolicy(keep_last=1)
    dry = prune_location(open_location(root), policy, dry_run=True)
    assert dry.retired == (1,)  # the base of steps 2 and 3: step 3 references its files
    real = prune_location(open_location(root), policy)
    assert real.retired == dry.retired and real.deleted == dry.deleted
    assert _comparable(dry.to_json()) == _comparable(real.to_json())


def test_cli_dry_run_marks_retired(tmp_path, capsys):
    root = _root(tmp_path)
    assert main(["prune", root, "--keep-last", "1", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["retired"] == [1] and dry["deleted"] == [1, 2]
    assert main(["prune", root, "--keep-last", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines()[1:]}
    assert rows == {"1": "retire", "2": "delete", "3": "keep"}, text
    assert "(1 retired)" in text.splitlines()[0]
    assert main(["prune", root, "--keep-last", "1", "--json"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert _comparable(real) == _comparable(dry)
