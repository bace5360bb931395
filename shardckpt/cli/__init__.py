"""The ``shardckpt`` command line."""
