"""Models: load a base (the bundled tiny model, a local HF directory, a hub id), render prompts
through its chat template, sample, wrap in LoRA, plan memory, pretrain the demo's base, and the
optimiser helpers every training loop shares.

Imports the ground and core.data; nothing about stages, runs or the app.
"""
