"""Multi-process adapter training with DistributedDataParallel (``torchrun``).

Launch: ``torchrun --nproc-per-node N -m train.cli --cache cache/ ...`` (``WORLD_SIZE`` > 1 in the
environment), or call ``fit_adapters`` inside processes that already joined a process group.
Backend: NCCL on CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on CPU.

The global batch is ``train.batch_size`` pairs (as in one process); every rank draws the same
permutation and mixup (same seed) and embeds its own contiguous shard of batch / N rows. The
embeddings are all-gathered with gradient (``gather_with_grad``: its backward all-reduces the
gradient of the gathered rows and hands each rank its slice), so every rank computes the
InfoNCE loss of the whole global batch, with all of its negatives: the same value as one
process. (Each rank computes the batch x batch logits; for batches up to a few thousand that
is small next to the adapters, which are what the shards split.)

Gradient bookkeeping: rank r's shard z_r receives sum over ranks of dL/dz_r = N dL/dz_r
(every rank holds the same loss L), and DDP averages parameter gradients over ranks:
(1/N) sum_r N dL/dz_r dz_r/dtheta = dL/dtheta, the single-process gradient.
(AdamW's update is invariant to a constant gradient scale, so only a gradient test catches a
wrong factor: tests/test_train_scale.py compares the gradients themselves.)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.runtime import rank_device, resolve_device
from train.errors import TrainError

TIMEOUT = datetime.timedelta(hours=2)  # how long ranks wait for rank 0 (evaluation, writing outputs)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (rank 0 of 1 without distribution).

    owns_group: the group was created here (and is destroyed by ``close``)."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join (or create, under torchrun) the process group and pick this rank's device.

    device_name: ``train.device`` (one process: ``pipeline.runtime.resolve_device``).
    With several processes, ``auto``/``cuda`` mean ``cuda:LOCAL_RANK`` (NCCL) when CUDA is
    present, else CPU (gloo); a fixed ``cuda:N`` is refused (every rank would use one GPU).
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and _env_world() <= 1:
        return Dist(), resolve_device(device_name)
    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process.")
    device = rank_device(device_name)
    owns = False
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), owns), device


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along rows whose backward returns, to each rank, the sum over ranks of the
    gradient of its own rows (all-reduce of the gathered gradient, then this rank's slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, d) local rows -> (world * b, d), rank 0's rows first (every rank has the same b).
    Backward: each rank's rows get the gradient summed over all ranks' losses."""
    return _GatherWithGrad.apply(x)
