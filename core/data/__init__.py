"""Data: the SQLite store (prompts, demonstrations, rankings, runs, metrics, checkpoints, rollouts),
the file shapes it imports and exports, and the demo task with its simulated labeler.

Imports only the ground (core.config, core.paths, core.textsafe, ...): no torch, no models.
"""
