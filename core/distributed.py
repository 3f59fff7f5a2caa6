"""Several processes, one stage: the little a stage needs from accelerate, in one object.

`Distributed()` is a no-op on one process (the app's job threads, a plain `rlhf sft`): rank 0 of 1,
every reduction returns its input, `prepare` returns what it is given. Under `accelerate launch`
(`rlhf <stage> --processes N`, built by core/runs/launch.py) `Distributed.from_environment` wraps
accelerate's `Accelerator`, which prepares models and optimizers for DDP, DeepSpeed ZeRO or FSDP2
and owns the process group. A stage reads its `Distributed` from `events.dist`.

Batch sizes in configs are global (the recipe's numbers); each rank takes its `shard` of every global
batch, so a run means the same thing on 1 or N processes (docs/NOTES.md, "Several processes").
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI, the app's pages and Events load this module
    import torch

# Set by core/runs/launch.py in the environment of `accelerate launch`: the stage builds an Accelerator.
LAUNCHED_ENV = "RLHF_WORKBENCH_ACCELERATE"


def global_batch_sizes(stage: str, config) -> list[tuple[str, int]]:
    """(field, size) of every global batch a stage (sft, rm, ppo) splits over the ranks, each a whole share
    per rank."""
    sizes = [("batch_size", config.batch_size)]
    if stage == "ppo":
        # Each rank splits its share of the episodes into num_minibatches, and takes its share of each ptx batch.
        sizes.append(("batch_size / num_minibatches", config.batch_size // config.num_minibatches))
        if config.ptx_coef > 0:
            sizes.append(("ptx_batch_size", config.ptx_batch_size))
    return sizes


def check_batches(stage: str, config, processes: int) -> None:
    """Every global batch of `stage` divides evenly over `processes`; else ValueError naming the field.
    The launcher checks before starting any process, each rank again before loading a model."""
    for field, size in global_batch_sizes(stage, config):
        if size % processes:
            raise ValueError(f"{field}={size} is a global batch size: it must divide evenly over "
                             f"{processes} processes")


class Distributed:
    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls, cpu: bool) -> "Distributed":
        """The process group `accelerate launch` set up, or a single process when not launched by it.
        `cpu`: the stage runs on the CPU (gloo), even where a GPU is visible."""
        if os.environ.get(LAUNCHED_ENV) != "1":
            return cls()
        from accelerate import Accelerator

        return cls(Accelerator(cpu=cpu))

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def is_main(self) -> bool:
        """The one process that writes checkpoints, store rows and progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Optimizer state split over the ranks (DeepSpeed, FSDP): a checkpoint resumes only on the
        same number of processes. DDP keeps whole copies, so its checkpoints resume on any number."""
        if self.accelerator is None:
            return False
        return self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")

    # -- data ------------------------------------------------------------------------------------

    def check_batches(self, stage: str, config) -> None:
        check_batches(stage, config, self.world_size)

    def batch_starts(self, n: int, batch_size: int) -> range:
        """Where each global batch of `batch_size` starts among `n` examples; a last batch too short to give
        every rank an example is dropped (with one process, none is)."""
        return range(0, n - self.world_size + 1, batch_size)

    def shard(self, items: Sequence):
        """This rank's share of a global batch: every world_size-th item, starting at its rank (a list;
        a tensor's rows stay a tensor)."""
        share = items[self.rank :: self.world_size]
        return share if hasattr(share, "shape") else list(share)

    # -- training --------------------------------------------------------------------------------

    def loss_denominator(self, local_count: torch.Tensor) -> torch.Tensor:
        """What a rank divides its summed token losses by so that the ranks' averaged gradients (DDP
        averages them) are the gradient of the mean over the global batch's tokens: the global count
        over the number of ranks (a collective). One process: its own count (at least 1)."""
        if self.accelerator is None:
            return local_count.clamp(min=1).float()
        total = self.all_reduce_sum(local_count.detach().double().cpu().reshape(1))
        return (total.clamp(min=1) / self.world_size).float().to(local_count.device).squeeze(0)  # a fraction: not the count's int dtype

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model to train through, optimizer). The plain `model` stays usable for evaluation and
        saving under DDP; under ZeRO-3/FSDP2 read it inside `full_weights`."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        # Through accelerate so DDP averages gradients and DeepSpeed runs its own backward and step.
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters, max_norm: float) -> None:
        if self.accelerator is None:
            import torch

            torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        else:
            self.accelerator.clip_grad_norm_(parameters, max_norm)

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Every rank holds the full parameters inside this block: sampling, evaluation and saving
        need them where ZeRO-3 or FSDP2 shard them. A no-op for DDP and one process. Every rank
        must enter it (the gather is a collective)."""
        plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                yield
        elif self.accelerator is not None and self.accelerator.distributed_type.name == "FSDP" and hasattr(model, "unshard"):
            model.unshard()  # FSDP2 (fully_shard) modules gather their parameters here ...
            try:
                yield
            finally:
                model.reshard()  # ... and free them again
        else:
            yield

    # -- agreement between ranks -------------------------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed element-wise over the ranks (a collective), on the CPU."""
        if self.accelerator is None:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum").cpu()

    def reduce_metrics(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """One logged row for all ranks: the mean of each metric, the sum of throughputs (`*_per_s`,
        the whole run's rate); a metric None on any rank is None. Every rank must call it with the
        same keys (a collective)."""
        if self.accelerator is None:
            return values
        import torch

        keys = sorted(values)
        local = torch.tensor([math.nan if values[k] is None else float(values[k]) for k in keys], dtype=torch.float64)
        total = self.all_reduce_sum(local)
        return {k: None if math.isnan(t) else float(t) if k.endswith("_per_s") else float(t) / self.world_size
                for k, t in zip(keys, total.tolist())}

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer on every rank (a stop request, read once, acted on by all at the same step)."""
        if self.accelerator is None:
            return flag
        import torch

        return bool(self.all_reduce_sum(torch.tensor([float(flag) if self.is_main else 0.0])).item())

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group together: a rank that exits while another still holds the group
        makes gloo abort that one (a failed run after a finished stage)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()


__all__ = ["Distributed", "LAUNCHED_ENV", "check_batches", "global_batch_sizes"]
