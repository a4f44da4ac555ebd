"""Integrations with training frameworks; each module imports its framework on use
(``worm_fast.integrations.huggingface`` needs ``transformers`` and ``accelerate``)."""
