"""CheckpointManager's arguments are checked before anything is opened or created."""

import pytest

import shardckpt


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replicas": ["{root}"]}, "given twice"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 2}, "min_replicas"),
    ({"save_every": 0}, "save_every"),
    ({"snapshot": "lazzy"}, "snapshot"),
    ({"on_error": "ignore"}, "on_error"),
])
def test_a_bad_argument_is_a_value_error_and_creates_nothing(tmp_path, kwargs, message):
    root = tmp_path / "run"
    kwargs = {k: [str(root)] if v == ["{root}"] else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        shardckpt.CheckpointManager(str(root), **kwargs)
    assert not root.exists()


def test_retention_must_be_a_policy(tmp_path):
    with pytest.raises(TypeError, match="RetentionPolicy"):
        shardckpt.CheckpointManager(str(tmp_path / "run"), retention={"keep_last": 2})
