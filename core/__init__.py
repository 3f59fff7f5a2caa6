"""RLHF Workbench core: the InstructGPT recipe (SFT -> reward model -> PPO-ptx) as a library.

Nothing here imports streamlit; the app in `workbench/` and `pages/` and the `rlhf` CLI both
call into these modules.
"""

__version__ = "0.1.0"
