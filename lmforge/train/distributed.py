"""Data-parallel training on PyTorch's own engine: torchrun, DDP, ZeRO-1 and FSDP2.

Nothing here communicates by itself: DDP (``DistributedDataParallel``), ZeRO-1
(``ZeroRedundancyOptimizer`` over DDP) and FSDP2 (``fully_shard``) do the collectives, torchrun launches
the processes and its rendezvous joins nodes.  This module decides *what* is wrapped and how the Trainer's
step maps onto ranks:

* **The global batch is one sequence for every world size.**  Every rank draws the same global batch
  from the same seeded source (``next_batch(global_batch_size)``) and keeps rows
  ``[r·B/W, (r+1)·B/W)`` (:meth:`Dist.shard_batch`).  The target count that normalises the loss is counted
  on the whole global batch, so it is already global: no extra all-reduce, and rank ``r``'s summed loss
  divided by it is exactly its share of the one-process loss.
* **The gradient is the one-process gradient.**  DDP and FSDP *average* gradients over ranks; each rank
  scales its loss by ``W`` first (:attr:`Dist.grad_scale`), so the average is the sum of shares.
* **Accumulation without redundant all-reduces.**  Every micro-batch but the last runs under
  ``no_sync()`` (DDP, ZeRO-1) or ``set_requires_gradient_sync(False)`` (FSDP2).
* **The wrapped module is model + objective** (:class:`LossModule`).  Objectives call more than
  ``forward`` (``model.lm_head``, ``model.features``, ``model.classify``); with the loss inside the wrapped
  forward, DDP's reducer and FSDP's unshard/reshard hooks see the whole computation whatever the
  objective touches.
* **FSDP2 shards each transformer block, then the root** (every element of an ``nn.ModuleList`` that
  holds parameters: the blocks of every family, the ladder's projections), with
  ``reshard_after_forward`` (false ≈ ZeRO-2), CPU offload, and a mixed-precision policy (bf16
  parameters, fp32 gradient reductions) whose master weights stay fp32.

Launch: ``torchrun --nproc_per_node=N -m lmforge pretrain CONFIG`` (multi-node: torchrun's ``--nnodes``,
``--rdzv-backend``, ``--rdzv-endpoint``; ``run_dir`` must be on a filesystem every node sees, since rank 0
renames each checkpoint into place once all ranks have written their shards).  A strategy other than ``none`` without torchrun runs a
1-process group (useful to resume a sharded checkpoint on one process).  A rank that fails exits
non-zero; torchrun then stops the others and names the failed rank, and collectives time out after
``distributed.timeout_s`` rather than hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.distributed as td
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.core.errors import ConfigError, LmforgeError, RunError
from lmforge.train.batching import slice_rows

STRATEGIES = ("auto", "none", "ddp", "zero1", "fsdp")


@dataclass
class DistributedConfig:
    """The ``distributed:`` section of a training config."""

    strategy: Literal["auto", "none", "ddp", "zero1", "fsdp"] = "auto"
    """auto = ddp when launched with more than one process, else none; zero1 = ZeroRedundancyOptimizer over
    DDP (optimizer state sharded); fsdp = FSDP2 fully_shard per block then the root (parameters, gradients and
    optimizer state sharded)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward (ZeRO-3); false keeps them until
    backward (≈ ZeRO-2: more memory, one all-gather less per block)."""
    cpu_offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (the optimizer steps on CPU)."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """fsdp mixed precision: the dtype blocks compute in (gathered parameters); gradients are reduced in
    fp32 and the sharded master weights and optimizer state stay fp32."""
    find_unused_parameters: bool = True
    """ddp/zero1: let DDP tolerate trainable parameters that get no gradient in a step (a fine-tuned BERT's
    unused pretraining heads, a BitFit bias in an unused head).  On by default, as in transformers' Trainer;
    false skips one autograd-graph walk per step when every trainable parameter is always used."""
    timeout_s: float = 1800.0
    """Collective timeout: a rank that stops answering ends the job after this long instead of hanging it."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"distributed.timeout_s must be > 0, got {self.timeout_s}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


class Dist:
    """This process's place in the job: rank, world size, strategy, and the few collectives the Trainer uses.

    ``Dist()`` (no arguments) is the single-process case: rank 0 of 1, every method a no-op.
    """

    def __init__(self, strategy: str = "none", rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 cfg: DistributedConfig | None = None, owns_group: bool = False) -> None:
        self.strategy = strategy
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.cfg = cfg or DistributedConfig(strategy="none")
        self.owns_group = owns_group

    # ---- facts -----------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Loss multiplier that turns the ranks' averaged gradient into the global sum of shares."""
        return float(self.world_size) if self.enabled else 1.0

    def describe(self) -> str:
        if not self.enabled:
            return "single process"
        return f"{self.strategy}, {self.world_size} ranks ({td.get_backend()})"

    # ---- the global batch -----------------------------------------------------------------------

    def check_batch(self, global_batch_size: int, micro_batch_size: int | None) -> int:
        """Rows per rank for ``global_batch_size``; one-line errors when the sizes do not divide."""
        W = self.world_size
        if global_batch_size % W:
            lo = global_batch_size - global_batch_size % W
            hint = f"{lo} or {lo + W}" if lo else f"{W}"
            raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by the world size "
                              f"{W}; set it to a multiple of {W} (e.g. {hint})")
        per_rank = global_batch_size // W
        if micro_batch_size is not None and per_rank % micro_batch_size:
            fits = max(d for d in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % d == 0)
            raise ConfigError(f"train.micro_batch_size={micro_batch_size} does not divide the {per_rank} rows each of "
                              f"the {W} ranks gets (global batch {global_batch_size}); set train.micro_batch_size "
                              f"to a divisor of {per_rank} (e.g. {fits})")
        return per_rank

    def shard_batch(self, batch: dict[str, Any], rows: int) -> dict[str, Any]:
        """Rank ``r``'s rows ``[r·n/W, (r+1)·n/W)`` of every entry whose leading dim is the batch size."""
        if not self.enabled or self.world_size == 1:
            return batch
        if rows % self.world_size:
            raise RunError(f"the batch source returned {rows} rows, which {self.world_size} ranks cannot split "
                           f"evenly; next_batch(n) must return exactly n rows")
        per = rows // self.world_size
        return slice_rows(batch, rows, self.rank * per, (self.rank + 1) * per)

    # ---- collectives ------------------------------------------------------------------------------

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place and returned (``op``: sum, max or min); a no-op in a single process."""
        if self.enabled and self.world_size > 1:
            td.all_reduce(t, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op])
        return t

    def barrier(self) -> None:
        if self.enabled and self.world_size > 1:
            td.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not (self.enabled and self.world_size > 1):
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Any) -> Any:
        """``fn()`` on rank 0 only; every rank gets its result, or raises the same one-line error it raised (so
        a user error on rank 0 never leaves the other ranks waiting in a collective)."""
        if not (self.enabled and self.world_size > 1):
            return fn()
        outcome: tuple[Any, ...] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except LmforgeError as e:
                outcome = ("error", type(e), str(e))
        outcome = self.broadcast_object(outcome)
        if outcome[0] != "ok":
            raise outcome[1](outcome[2])
        return outcome[1]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (builds caches, writes files); the others then run it and reuse them."""
        if self.is_main:
            yield
            self.barrier()
        else:
            self.barrier()
            yield

    def close(self) -> None:
        """Leave the job together: a barrier first, so that no rank tears its connections down while another
        still talks to it."""
        if self.owns_group:
            if td.is_initialized():
                self.barrier()
                td.destroy_process_group()
            self.owns_group = False


def setup_distributed(cfg: DistributedConfig | None, device: str = "auto") -> tuple[Dist, str]:
    """Join the job torchrun launched (or make a 1-process group) and return ``(dist, device)``.

    ``device`` is the training device as configured; on CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    cfg = cfg or DistributedConfig()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none":
        if world > 1:
            raise ConfigError(f"launched with {world} processes (WORLD_SIZE={world}) but distributed.strategy=none; "
                              f"set distributed.strategy to ddp, zero1 or fsdp, or launch one process")
        return Dist(cfg=cfg), device

    if not td.is_available():
        raise ConfigError(f"distributed.strategy={strategy} needs torch.distributed, which this PyTorch build lacks; "
                          f"use distributed.strategy=none")
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if want_cuda else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and td.is_nccl_available()):
        raise ConfigError("distributed.backend=nccl is not available here (no CUDA device or no NCCL in this "
                          "PyTorch build); use distributed.backend=gloo")
    if backend == "gloo" and not td.is_gloo_available():
        raise ConfigError("distributed.backend=gloo is not available in this PyTorch build; use distributed.backend=nccl")
    if want_cuda:
        if device in ("auto", "cuda"):
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    owns = False
    if not td.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if "MASTER_ADDR" in os.environ:
            td.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                                  device_id=torch.device(device) if backend == "nccl" else None)
        else:
            if world > 1:
                raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR is not set; launch with torchrun")
            td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    else:
        rank, world = td.get_rank(), td.get_world_size()
    return Dist(strategy, rank, world, local_rank, cfg, owns_group=owns), device


# ---- wrapping ------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """``model`` + ``objective`` as one module whose forward is the objective's loss.

    The objective is kept off the module tree (it is not an ``nn.Module`` and owns no trained state), so the
    state dict is the model's with a ``model.`` prefix."""

    def __init__(self, model: nn.Module, objective: Any) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_objective", objective)

    def forward(self, batch: dict[str, Any]) -> Any:
        return self._objective.loss(self.model, batch)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: every element of an ``nn.ModuleList`` that holds parameters."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if id(child) not in seen and any(True for _ in child.parameters()):
                    seen.add(id(child))
                    found.append(child)
    return found


def fp32_units(block: nn.Module) -> list[nn.Module]:
    """Delta submodules inside ``block`` that compute in fp32 under a bf16 policy: what each delta layer lists in
    its ``fp32_units()`` (LoRA's A and B, an adapter's projections), called only through their own forward."""
    return [unit for m in block.modules() if hasattr(m, "fp32_units") for unit in m.fp32_units()]


def wrap(loss_module: LossModule, dist: Dist, device: torch.device) -> nn.Module:
    """Wrap ``loss_module`` (in place for fsdp) for ``dist.strategy``; returns the module to call."""
    if dist.strategy in ("ddp", "zero1"):
        ids = [device.index] if device.type == "cuda" else None
        return DDP(loss_module, device_ids=ids, find_unused_parameters=dist.cfg.find_unused_parameters)
    if dist.strategy == "fsdp":
        if dist.cfg.cpu_offload and device.type != "cuda":
            raise ConfigError(f"distributed.cpu_offload=true moves GPU shards to CPU memory, but this run trains on "
                              f"{device.type}, already in CPU memory; set distributed.cpu_offload=false")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dist.cfg.param_dtype == "bf16" else None,
                                  reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if dist.cfg.cpu_offload else OffloadPolicy()
        for p in loss_module.parameters():  # FSDP shards dim 0 of contiguous tensors only
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        # The mesh is the training device's, not "whatever accelerator exists" (train.device=cpu on a GPU box).
        mesh = init_device_mesh(device.type, (dist.world_size,))
        blocks = block_modules(loss_module.model)
        if mp.param_dtype is not None:
            # Delta tuning under bf16: the trainable modules inside a block (LoRA A/B, adapter projections) are
            # their own units that compute in fp32 (inputs cast up on entry; the delta casts its output back).
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for island in (m for block in blocks for m in fp32_units(block)):
                fully_shard(island, mesh=mesh, reshard_after_forward=dist.cfg.reshard_after_forward,
                            mp_policy=fp32, offload_policy=offload)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=dist.cfg.reshard_after_forward, mp_policy=mp,
                        offload_policy=offload)
        # The root's input is the whole batch dict: FSDP would cast every float in it (loss weights, targets) to
        # bf16; the blocks still cast the hidden states they receive.
        root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
        fully_shard(loss_module, mesh=mesh, mp_policy=root_mp, offload_policy=offload)
        return loss_module
    return loss_module


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, dist: Dist, sync: bool) -> Iterator[None]:
    """Run one micro-batch's backward with (``sync``) or without the gradient all-reduce / reduce-scatter."""
    if not dist.enabled or sync:
        if dist.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        yield
        return
    if dist.strategy in ("ddp", "zero1"):
        with wrapped.no_sync():
            yield
    else:  # fsdp
        wrapped.set_requires_gradient_sync(False)
        yield


@contextlib.contextmanager
def gathered_root(loss_module: nn.Module, dist: Dist) -> Iterator[None]:
    """fsdp: gather the root's own parameters (embeddings, final norm, heads) for calls that bypass the
    wrapped forward (evaluation); the blocks gather themselves in their forward."""
    if dist.strategy != "fsdp":
        yield
        return
    loss_module.unshard()
    try:
        yield
    finally:
        loss_module.reshard()


@contextlib.contextmanager
def gathered_for_generation(loss_module: nn.Module, dist: Dist) -> Iterator[None]:
    """fsdp: every unit's full parameters gathered once for a whole generation call, then sharded again.

    Decoding runs one forward per token; left to themselves the blocks would all-gather and free their
    parameters in every one of them -- a collective per block per token, and every rank forced to run exactly as
    many steps as the slowest (its prompts finish when they finish).  Gathered up front, with resharding after
    forward switched off, a rank decodes on its own and the only collectives are these gathers.  Needs the root's
    lazy initialisation (normally its first forward) before any block runs forward alone: torch refuses a block
    that ran first as a second root.  On exit each unit is resharded and gets back the setting ``wrap`` gave it
    (the blocks ``distributed.reshard_after_forward``, the root never)."""
    if dist.strategy != "fsdp":
        yield
        return
    units = [m for m in loss_module.modules() if isinstance(m, FSDPModule)]
    loss_module._get_fsdp_state()._lazy_init()  # no public route: what the root's first forward would run
    for unit in units:
        unit.unshard()
    loss_module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        loss_module.set_reshard_after_forward(dist.cfg.reshard_after_forward)  # every unit, the root included
        loss_module.set_reshard_after_forward(False, recurse=False)  # then the root alone back to its own
        for unit in units:
            unit.reshard()


def build_zero1_optimizer(groups: list[dict[str, Any]], lr: float, betas, eps: float,
                          fused: bool) -> torch.optim.Optimizer:
    """ZeroRedundancyOptimizer over AdamW: each rank keeps the AdamW state of its partition of whole tensors."""
    plain = [{**{k: v for k, v in g.items() if k != "params"}, "params": [p for _, p in g["params"]]} for g in groups]
    kwargs: dict[str, Any] = {"lr": lr, "betas": (float(betas[0]), float(betas[1])), "eps": eps}
    if fused:
        kwargs["fused"] = True
    return ZeroRedundancyOptimizer(plain, optimizer_class=torch.optim.AdamW, **kwargs)


# ---- what each rank holds ------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: ``param_bytes`` (its shards under fsdp) and ``optim_bytes`` (AdamW state:
    its partition under zero1, its shards under fsdp)."""
    seen: set[int] = set()
    param_bytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        loc = _local(p)
        param_bytes += loc.numel() * loc.element_size()
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its local AdamW in .optim
    optim_bytes = 0
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                loc = _local(v)
                optim_bytes += loc.numel() * loc.element_size()
    return {"param_bytes": param_bytes, "optim_bytes": optim_bytes}


def shutdown() -> None:
    """End this process's part in a job that succeeded (the CLI calls it after a command): destroy the process
    group, every rank together.  Recipes end their last collective with ``Dist.barrier``, after which rank 0 may
    still score and save for longer than the group's timeout, so the others wait for its word on the rendezvous
    store (no collective, no group timeout) rather than in a barrier: a rank that tore its gloo group down while
    rank 0 was still working has aborted at exit ("terminate called without an active exception").  (After an error
    a rank just exits: torchrun then stops the others.)"""
    if not (td.is_available() and td.is_initialized()):
        return
    try:
        store = td.distributed_c10d._get_default_store()
        if td.get_rank() == 0:
            store.set(_DONE_KEY, "1")
        else:
            store.wait([_DONE_KEY], datetime.timedelta(hours=24))
        td.barrier()  # everyone is idle now: a short one, so the groups go down together
    except Exception:  # noqa: BLE001 - no store, or rank 0 gone: leave as before
        pass
    td.destroy_process_group()


_DONE_KEY = "lmforge/rank0_done"  # set by rank 0 in shutdown(), awaited by the other ranks


def require_single_process(command: str) -> None:
    """One-line error for commands that do not run under a multi-process launch yet."""
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        raise ConfigError(f"`lmforge {command}` runs in one process, but it was launched with {world} (WORLD_SIZE={world}); "
                          f"run it without torchrun (`lmforge pretrain` runs under torchrun)")
