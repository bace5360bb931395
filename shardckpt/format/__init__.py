"""Serialization: the ``.shard`` file and ``manifest.json``. Bytes and checksums only."""
