"""DLRM trained across processes with torch.distributed (launched by ``torchrun``):
model parallelism for the tables, data parallelism for the MLPs, as TorchRec does.

Plan device ``d`` runs on rank ``d``; the plan's device count must equal the world
size. The global batch of step ``s`` is the one-process batch (``data.batch(s, B)``,
the same on every rank) and rank ``r`` takes samples ``[r b, (r + 1) b)`` with
``b = B / W``. Every table is served by *lookup jobs*: a whole table (table-wise), or
one shard of a row-wise, table-row-wise or column-wise table, each on the rank that
owns it in the plan, for the whole global batch. Per training step:

1. ids to the jobs (``all_to_all_single``, twice: the per-sample lengths, ``W b``
   int64 per job, then the ids themselves; row-wise ids go only to the shard owning
   their row, rebased to it; column-wise ids go to every column shard);
2. each rank pools its jobs for all ``B`` samples (table-batched for whole tables);
3. pooled embeddings back to the samples' ranks (one ``all_to_all_single`` of
   ``B x sum(job widths)`` float32 in all; backward: the same exchange reversed), where
   row-wise partial sums are added and column-wise pieces concatenated;
4. data-parallel tables: every rank holds a replica and pools its own samples locally;
5. after backward, ONE ``all_reduce`` (sum) of a flat buffer: the MLP gradients, the
   dense gradients of the data-parallel tables with a touched-row flag per row (their
   rows x (dim + 1) floats), and the local loss;
6. row-wise Adagrad on a column-wise table split over several ranks: its per-row sums
   of squares are all-reduced among the ranks holding its columns.

Tables in a cached tier (``dram_cache``, ``store_cache``; table-, row- and
table-row-wise) are lookup jobs like the others, served by their owner through row
caches over ITS table store, ``<store_dir>/device-<rank>`` (the layout of one
process too, :mod:`dlrm_runtime.embeddings.stores`); the reverse exchange brings each cached
job its pooled gradient, and the fused row optimizer updates the cached rows inside
the backward. Since every rank has the global batch, each rank prefetches the next
batch's rows of its own cached shards without an exchange. A checkpoint is one
transaction over rank 0's runtime checkpoint and every rank's store (two-phase, see
:mod:`dlrm_runtime.checkpoint`).

The backward runs on ``local_loss / W``: gradients summed over ranks are then exactly
the gradients of the global mean loss, so the run computes what one process does on
the whole batch (up to float summation order). Only rank 0 writes progress, the
metrics log and checkpoints; a checkpoint holds every table whole (gathered to rank
0), in the format of :mod:`dlrm_runtime.checkpoint`, so a run resumes with any
process count.

The package: :mod:`.collectives` (process group, all-to-all), :mod:`.jobs` (lookup
jobs, this rank's batch), :mod:`.model_parallel` (this rank's tables and exchanges),
:mod:`.trainer` (the step and the loop on every rank), :mod:`.launch` (the workers
started from this process, without torchrun).
"""

from dlrm_runtime.distributed.collectives import (
    ProcessGroupInfo,
    free_port,
    init_from_env,
    process_group_info,
    shutdown,
)
from dlrm_runtime.distributed.jobs import LookupJob, local_batch, lookup_jobs
from dlrm_runtime.distributed.launch import (
    LaunchSpec,
    WorkerFailure,
    WorkersFailed,
    WorkersInterrupted,
    launch,
    record_failure,
)
from dlrm_runtime.distributed.model_parallel import DistributedEmbeddings, DistributedRowOptimizer
from dlrm_runtime.distributed.trainer import (
    DistributedTrainer,
    evaluate_distributed,
    train_distributed,
)

__all__ = [
    "DistributedEmbeddings", "DistributedRowOptimizer", "DistributedTrainer", "LaunchSpec",
    "LookupJob", "ProcessGroupInfo", "WorkerFailure", "WorkersFailed", "WorkersInterrupted",
    "evaluate_distributed", "free_port", "init_from_env", "launch", "local_batch", "lookup_jobs",
    "record_failure",
    "process_group_info", "shutdown", "train_distributed",
]
