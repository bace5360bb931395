"""The phases of ``benchmarks/throughput.py`` and what it makes of them.

``bench``: ``Bench``, the state, the manager and one repetition of the phases; ``save``: the
save phases (memcpy, the raw write, shardckpt async and blocking, DCP's three modes); ``load``:
the read phases (raw read, shardckpt load, DCP load); ``summary``: medians, ratios, targets and
notes for the JSON document; ``plot``: its bar chart. Shared pieces come from ``common``.
"""

SAVE_PHASES = ("memcpy", "raw_write", "shardckpt_async", "shardckpt_blocking", "dcp_save",
               "dcp_async_save", "dcp_async_save_process")
LOAD_PHASES = ("raw_read", "shardckpt_load", "dcp_load")
ALL_PHASES = SAVE_PHASES + LOAD_PHASES
ASYNC_PHASES = ("shardckpt_async", "dcp_async_save", "dcp_async_save_process")
