"""The parts of ``benchmarks/recovery.py`` (issue 28): ``worker`` runs under each of the two
``torchrun`` agents (training with both tiers, the measured saves, the resumes); ``launch``
starts and kills the simulated nodes and the S3 server; ``summary`` turns the workers' results
into the JSON document, its targets and the figure."""
