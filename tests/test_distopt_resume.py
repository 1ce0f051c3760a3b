"""The distributed optimizer resumes: Megatron DDP + DistributedOptimizer (torch's AdamW, no TE/apex) on tnl-tiny.

One DP=2 run trains 6 steps and saves torch_dist checkpoints after step 3 in both optimizer formats that
Megatron-LM core_v0.19.0's pretrain_gpt.py writes. Fresh processes load each checkpoint and train steps 4-6:
losses, parameters and Adam's step counts must equal the uninterrupted run's, bitwise (same ranks, same
reduction order). A DP=1 process loading the DP=2 checkpoints and accumulating both micro-batches of a step
gives the same losses and the parameters to float rounding.

The workers import a copy of the installed megatron package with patches/ applied (conftest.py's
patched_megatron). Unpatched, loading fails in both formats (assert len(steps) == 1); without the patch's per-parameter
step, the resumed losses differ from step 5; without its step handling in _set_main_param_and_optimizer_states,
dp_reshardable reloads Adam's step as 0 and fully_reshardable raises KeyError 'step'; without its no_grad, the
dp_reshardable load raises on the fp32 main parameters (views of leaves that require grad).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

STEPS, SAVE_AT, LR = 6, 3, 1e-2
# The optimizer formats pretrain_gpt.py writes into a torch_dist checkpoint (megatron/training/checkpointing.py,
# _build_sharded_state_dict_metadata): dp_reshardable by default, fully_reshardable with
# --dist-ckpt-optim-fully-reshardable. The other two sharding types of DistributedOptimizer are deprecated and only
# read from old checkpoints.
FORMATS = ("dp_reshardable", "fully_reshardable")


def _setup(seed: int):
    """(model, optimizer) of tnl-tiny initialised from ``seed``: Megatron DDP + DistributedOptimizer over all ranks
    (data parallel)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tnllm.models import build_model
    from tests.cpu_shims import apply_ddp_cpu_shims

    apply_ddp_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    module = build_model("tnl-tiny", use_cpu_initialization=True)
    # Small buckets: several per rank, so the bucket-space formats shard across buckets as on a big model.
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, bucket_size=40_000)
    model = DistributedDataParallel(module.config, ddp_config, module)
    config = OptimizerConfig(
        optimizer="adam",
        lr=LR,
        weight_decay=0.1,
        clip_grad=1.0,
        use_distributed_optimizer=True,
        params_dtype=torch.float32,
    )
    return model, get_megatron_optimizer(config, [model])


def _train_step(model, optimizer, step: int, dp: int) -> list[float]:
    """One step on the global batch of ``step`` (2 micro-batches, split over the DP ranks); the losses of
    this rank's micro-batches."""
    from megatron_tnllm.configs import get_preset
    from tests.megatron_utils import fixed_batch, loss_of

    model.zero_grad_buffer()
    optimizer.zero_grad()
    micro = 2 // dp
    losses = []
    for i in range(micro):
        batch = fixed_batch(get_preset("tnl-tiny").vocab_size, seed=100 * step + dist.get_rank() * micro + i)
        loss = loss_of(model, batch)
        (loss / micro).backward()
        losses.append(loss.item())
    model.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok
    return losses


def _adam_steps(optimizer) -> list[float]:
    return sorted({s["step"].item() for opt in optimizer.chained_optimizers for s in opt.optimizer.state.values()})


def _record(model, optimizer, losses, path: Path) -> None:
    """Losses, Adam's step counts and the (all-gathered) parameters of this rank."""
    params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    torch.save({"losses": losses, "steps": _adam_steps(optimizer), "params": params}, path)


def _sharded(model, optimizer, fmt: str, is_loading: bool) -> dict:
    from megatron.core import parallel_state

    model_sd = model.module.sharded_state_dict()  # pretrain_gpt.py checkpoints the unwrapped model
    metadata = {
        "distrib_optim_sharding_type": fmt,
        "distrib_optim_fully_reshardable_mem_efficient": False,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading, metadata=metadata)}


def _uninterrupted_worker(rank, world, out):
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import distrib_optimizer

    assert "megatron-tnllm" in Path(distrib_optimizer.__file__).read_text(), distrib_optimizer.__file__
    model, optimizer = _setup(seed=0)
    losses = []
    for step in range(1, STEPS + 1):
        losses.append(_train_step(model, optimizer, step, world))
        if step == SAVE_AT:
            for fmt in FORMATS:
                (out / fmt).mkdir(exist_ok=True)
                dist_checkpointing.save(_sharded(model, optimizer, fmt, is_loading=False), str(out / fmt))
    _record(model, optimizer, losses, out / f"full_rank{rank}.pt")


def _resume_worker(rank, world, out, formats):
    """For each format in turn (one process): a new model and optimizer load the checkpoint and train steps 4-6."""
    from megatron.core import dist_checkpointing

    for fmt in formats:
        model, optimizer = _setup(seed=1)  # the checkpoint, not the init, decides
        state = dist_checkpointing.load(_sharded(model, optimizer, fmt, is_loading=True), str(out / fmt))
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        assert _adam_steps(optimizer) == [SAVE_AT], f"{fmt}: Adam's step {_adam_steps(optimizer)}, saved at {SAVE_AT}"
        losses = [_train_step(model, optimizer, step, world) for step in range(SAVE_AT + 1, STEPS + 1)]
        _record(model, optimizer, losses, out / f"{fmt}_dp{world}_rank{rank}.pt")


def _compare(out: Path, fmt: str, dp: int, atol: float) -> str:
    full = [torch.load(out / f"full_rank{r}.pt") for r in range(2)]
    resumed = [torch.load(out / f"{fmt}_dp{dp}_rank{r}.pt") for r in range(dp)]
    # Losses of steps 4-6 in global micro-batch order: [rank0, rank1] at DP=2, [micro0, micro1] at DP=1.
    want = [[full[r]["losses"][s][0] for r in range(2)] for s in range(SAVE_AT, STEPS)]
    got = [[x for r in range(dp) for x in resumed[r]["losses"][s]] for s in range(STEPS - SAVE_AT)]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=0, atol=atol), f"{fmt} DP={dp}: {got} vs {want}"
    worst = 0.0
    for r in range(dp):
        assert resumed[r]["steps"] == full[r]["steps"] == [STEPS], (fmt, resumed[r]["steps"], full[r]["steps"])
        for name, p in full[r]["params"].items():
            diff = (resumed[r]["params"][name] - p).abs().max().item()
            assert diff <= atol, f"{fmt} DP={dp}: {name} off by {diff:.2e}"
            worst = max(worst, diff)
    return f"{fmt} DP=2 -> DP={dp}: losses {got[-1]} (uninterrupted {want[-1]}), max |param diff| {worst:.1e}"


@pytest.fixture(scope="module")
def uninterrupted(patched_megatron, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distopt")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(patched_megatron))  # spawned workers start with this sys.path
        run_distributed(_uninterrupted_worker, 2, out)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_dp2_is_bitwise_uninterrupted(uninterrupted, patched_megatron, monkeypatch, fmt):
    monkeypatch.syspath_prepend(str(patched_megatron))
    run_distributed(_resume_worker, 2, uninterrupted, [fmt])
    print("\n" + _compare(uninterrupted, fmt, 2, atol=0.0))


def test_resume_dp2_checkpoint_at_dp1(uninterrupted, patched_megatron, monkeypatch):
    """DP=1 accumulates both micro-batches of a step: the same losses (same forward), parameters to float
    rounding (the two gradients are summed in another order)."""
    monkeypatch.syspath_prepend(str(patched_megatron))
    run_distributed(_resume_worker, 1, uninterrupted, list(FORMATS))
    for fmt in FORMATS:
        print("\n" + _compare(uninterrupted, fmt, 1, atol=1e-5))
