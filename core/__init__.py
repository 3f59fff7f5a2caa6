"""RLHF Workbench core: the InstructGPT recipe (SFT -> reward model -> PPO-ptx) as a library.

Layers, bottom to top; a module imports only from its own layer or the ones below it (an
import-linter contract in pyproject.toml, checked by tests/test_layers.py):

    config, paths, distributed,   the ground: stage configs and their checks, file locations and
    textsafe, catalog              atomic writes, ranks, model text shown safely, checkpoint naming
    data/                          the SQLite store, file formats, the demo task and its labeler
    models/                        loading, chat templates, generation, LoRA, the memory planner
    stages/                        SFT, RM, PPO, DPO, GRPO, RLOO, the events a stage reports through
    labeling/  analysis/           the team's labeling server; readers of finished and live runs
    runs/                          jobs, launches, the pipeline and the study: runs of stages
    cli.py                         `rlhf ...`; the app (workbench/, pages/) sits beside it

Nothing here imports streamlit; the app and the `rlhf` CLI both call into these modules.
"""

__version__ = "0.1.0"
