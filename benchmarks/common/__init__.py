"""Pieces shared by the benchmark scripts in ``benchmarks/``.

The scripts run as ``python benchmarks/NAME.py`` or ``torchrun ... benchmarks/NAME.py``, which puts
``benchmarks/`` first on ``sys.path``; they import this package as ``common``
(``from common import machine``). A test that imports a script puts ``benchmarks/`` on
``sys.path`` first (see ``tests/test_scaling.py``). Importing ``common`` itself loads nothing;
``output``, ``rounds``, ``rss``, ``pagecache`` and ``machine`` load without torch (so a script
timing a command's start-up can use them; ``machine_info`` imports torch when called), the
others import it.

Modules, and what a new benchmark takes from each:

``machine``
    ``machine_info(dirpath, fsync=...)``: one JSON-ready description of the host, the software,
    the disk holding ``dirpath`` and the load average; ``git_info()``: the commit and any
    uncommitted package changes, so a figure can be tied to the code it measured.
``rss``
    ``RssSampler``: a context manager sampling the resident memory of this process and of its
    children (the process tree) every few milliseconds; ``gc_collect()``: collect garbage and give
    freed heap pages back to the OS before and after a measured region.
``pagecache``
    ``PageCache``: evicts files from the page cache before a read (``drop_caches`` when
    permitted, else ``posix_fadvise``), then reports how many of their bytes are still resident.
``rounds``
    ``interleaved_rounds(variants, reps, run)``: every variant once per round, in an order
    rotated by one per round, so drift on a shared machine hits each alike; ``median`` and
    ``medians`` of the results; ``rotate``.
``output``
    ``log`` (stderr, tagged with the rank), ``capture_stdout``/``emit_stdout`` (keep stdout for
    the JSON document alone), ``write_outputs(doc, out=..., plot=..., draw=...)``: the JSON to a
    file and to stdout plus an optional figure; ``pyplot()``: matplotlib without a display.
``distributed``
    ``init_process_group()`` (gloo, or gloo + NCCL with CUDA), ``gather_floats``,
    ``broadcast_from_rank0``, ``sync_device``, ``run_torchrun`` (start a script under
    ``torchrun --standalone``).
``phase``
    ``measure_phase(fn, ...)``: run one timed phase on every rank between barriers; times are the
    maximum over the ranks, with per-rank values, GB/s and RSS figures.
``fsdp_state``
    ``build``: an FSDP2 stack of ``nn.Linear`` layers plus AdamW state of a given size;
    ``local_tensors``, ``fingerprint``.
``rawio``
    ``HostBuffers`` (one flat CPU buffer holding a rank's tensors), ``write_raw``/``read_raw``:
    the disk's raw speed for the same bytes, the baseline for checkpoint throughput.
``dcp_modes``
    PyTorch DCP's save modes (``dcp.save``, ``dcp.async_save`` in thread and process mode) and
    load, called the way a user would, with the fsync choice applied consistently.
"""
