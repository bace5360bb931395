"""``shardckpt verify``: prove a checkpoint is intact, complete, loadable and reproduces its
golden outputs. :func:`verify` runs the phases (collective over a comm); see :mod:`.runner`.

Nothing is imported here: :mod:`.record` (which ``ls`` reads) needs no torch, the phases do.
"""
