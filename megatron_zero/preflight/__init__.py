"""Checks that read files, run by every command before any engine, worker or Ray starts.

Why: a command that finds a missing file or an over-long prompt after minutes of sampling (or after a multi-node
allocation started) has wasted that time. ``config/`` validates values only; what needs the disk (the model's
config.json, its weights and tokenizer, data files, the checkpoint a run resumes from) lives here, above it, and
``train``, ``train --dry-run``, ``plan``, ``eval``, ``difficulty`` and ``launch prepare`` share it.

Modules: ``architecture`` (the model's architecture, from the checkpoint or the shipped examples/model_configs),
``generation`` (one prompt + response fits the model and the engine: the check every generating command calls),
``train`` (every file a training run reads).
"""
