"""Runs: what runs stages. The job manager (jobs: threads and subprocesses, queue, stop, resume),
multi-process launches (launch), the demo pipeline and its data import (pipeline, demo_import),
and the over-optimisation study, a sweep of pipeline and PPO runs (study).

Imports every layer below it (analysis, labeling, stages, models, data, the ground); only the CLI
and the app import it.
"""
