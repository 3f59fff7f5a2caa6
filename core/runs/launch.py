"""`rlhf <stage> --processes N [--accelerate-config FILE]`: the same command again, under `accelerate launch`.

Everything a user can get wrong is checked here, before a process starts or the store is touched:
more processes than GPUs, a missing or malformed accelerate config, a DeepSpeed config without
DeepSpeed installed, a DeepSpeed or FSDP config for a run on the CPU, a global batch that does not
divide over the processes, and PPO on a config that shards parameters (ZeRO-3, FSDP2). The child
processes run `core.cli`
as usual; `LAUNCHED_ENV` tells them to join the process group (core/distributed.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import yaml

from core.distributed import LAUNCHED_ENV, check_batches

# The hand-written loops wired for several processes (docs/NOTES.md, "Several processes");
# dpo/grpo/rloo go through TRL's trainers and are not wired yet.
DISTRIBUTED_STAGES = ("sft", "rm", "ppo")
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
KNOWN_TYPES = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
STOP_FILE_ENV = "RLHF_WORKBENCH_STOP_FILE"  # a job's stop flag (core/runs/jobs.py), polled by every rank through rank 0
JOB_PARENT_ENV = "RLHF_WORKBENCH_JOB_PARENT"  # the job manager's pid, which hands its run to the child
PROGRESS_PREFIX = "rlhf-progress "  # a child's progress line on stdout, read by the job manager
CONFIG_ENV = "RLHF_WORKBENCH_ACCELERATE_CONFIG"  # the launch's accelerate config, which rank 0 records with its run


def progress_line(done: int, total: int, message: str) -> str:
    """A child's progress as one line of its output, for the job manager (`parse_progress`)."""
    return PROGRESS_PREFIX + json.dumps([done, total, message])


def parse_progress(line: str) -> tuple[int, int, str] | None:
    """(done, total, message) of a `progress_line`; None for any other line or a garbled one."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        done, total, message = json.loads(line[len(PROGRESS_PREFIX):])
    except (ValueError, TypeError):
        return None
    return done, total, message


def read_accelerate_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"accelerate config {path} does not exist (shipped ones: {', '.join(shipped_configs())})")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"accelerate config {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict) or "distributed_type" not in values:
        raise ValueError(f"accelerate config {path} must be a YAML mapping with a distributed_type "
                         f"(one of {', '.join(KNOWN_TYPES)}); write one with `accelerate config` or start from "
                         f"{CONFIGS_DIR}")
    if values["distributed_type"] not in KNOWN_TYPES:
        raise ValueError(f"accelerate config {path}: distributed_type {values['distributed_type']!r} is not one "
                         f"of {', '.join(KNOWN_TYPES)}")
    if values["distributed_type"] == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"accelerate config {path} asks for DeepSpeed, which is not installed: "
                         "pip install 'rlhf-workbench[deepspeed]'")
    return values


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))


def check(stage: str, config, processes: int, accelerate_config: str | Path | None) -> bool:
    """Validate a launch request; True when the stage must run under `accelerate launch`
    (False: the plain single-process path, unchanged). Raises ValueError, having written nothing."""
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, got {processes}")
    if accelerate_config is None and processes == 1:
        return False
    if stage not in DISTRIBUTED_STAGES:
        raise ValueError(f"{stage} runs on one process for now; --processes and --accelerate-config apply to "
                         f"{', '.join(DISTRIBUTED_STAGES)}")
    accelerate = read_accelerate_config(accelerate_config) if accelerate_config else {}
    from core.models.loading import pick_device

    device_type = pick_device(config.device).type
    if device_type == "cpu" and accelerate.get("distributed_type") in ("DEEPSPEED", "FSDP"):
        # accelerate would quietly run plain DDP instead (its CPU path ignores both plugins).
        raise ValueError(f"{accelerate_config} asks for {accelerate['distributed_type']}, which accelerate applies on "
                         f"GPUs only: on the CPU the stage would run as plain DDP; use {CONFIGS_DIR / 'ddp.yaml'} "
                         "or no config")
    if device_type == "cuda":
        import torch

        if processes > torch.cuda.device_count():
            raise ValueError(f"--processes {processes} is more than the {torch.cuda.device_count()} GPU(s) here "
                             "(one process per GPU); on the CPU use --set device=cpu")
    check_batches(stage, config, processes)
    if stage == "ppo" and sharded_weights(accelerate):
        raise ValueError(f"ppo runs on DDP or ZeRO-2 for now, not {accelerate_config} (ZeRO-3/FSDP2): its scoring "
                         "and ptx forwards read the policy outside the prepared module, which holds only a shard "
                         "there; use configs/accelerate/ddp.yaml or zero2.yaml")
    return True


def sharded_weights(accelerate: dict) -> bool:
    """The config shards parameters (ZeRO-3, FSDP), not only optimizer state."""
    zero_stage = (accelerate.get("deepspeed_config") or {}).get("zero_stage")
    return accelerate.get("distributed_type") == "FSDP" or zero_stage == 3


def command(processes: int, accelerate_config: str | Path | None, cpu: bool, cli_args: list[str],
            module: str = "core.cli") -> list[str]:
    """The `accelerate launch` argv that runs `python -m <module> <cli_args>` on `processes` ranks."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if accelerate_config:
        argv += ["--config_file", str(accelerate_config)]
    else:
        argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if processes > 1:
            # torchrun on one machine; the ranks pick gloo themselves on the CPU (core/distributed.py).
            # A free port, not torchrun's fixed default: two runs on one machine must not collide.
            argv += ["--multi_gpu", "--main_process_port", str(free_port())]
    if cpu:
        argv += ["--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "1")]
    return [*argv, "-m", module, *cli_args]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, LAUNCHED_ENV: "1", **(extra or {})}


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without --processes/--accelerate-config, for the children to run."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--processes", "--accelerate-config"):
            skip = True
        elif not arg.startswith(("--processes=", "--accelerate-config=")):
            out.append(arg)
    return out


__all__ = ["check", "command", "environment", "strip_launch_flags", "read_accelerate_config", "DISTRIBUTED_STAGES",
           "STOP_FILE_ENV", "JOB_PARENT_ENV", "PROGRESS_PREFIX", "CONFIG_ENV", "progress_line", "parse_progress"]
