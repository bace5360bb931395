"""Integrations with training frameworks, one module each, imported only when asked for.

``shardckpt.integrations.lightning`` (Lightning), ``shardckpt.integrations.transformers``
(the Hugging Face ``Trainer``). Importing this package imports neither framework.
"""
