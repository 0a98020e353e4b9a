"""The training loop behind recovery: AdamW, cosine schedule with warm-up, gradient accumulation
and clipping, the loss of an Objective (objective.py), multi-GPU through `accelerate`, a progress bar,
a JSON loss log, and checkpoints that resume exactly (trainable tensors, optimizer, schedule
position, data position; the noise is a function of the step, see noise.py).

Checkpoints live in a work directory: each one is a step-NNNNNN folder, and `state.json` (written
last, atomically) names the latest complete one, so an interrupted save never corrupts a resume.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import QRecoverError
from ..outputs import disk_errors
from ..resume import StateFile
from .config import TrainConfig
from .data import BatchOrder, collate


@dataclass
class TrainState:
    step: int = 0
    log: list = field(default_factory=list)
    resumed_from: int = 0  # the step an interrupted run was resumed at (0: not resumed)

    @property
    def seconds_before(self) -> float:
        """Training time of the earlier, interrupted runs (their steps up to the resumed one)."""
        return sum(r["seconds"] for r in self.log[: self.resumed_from])


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """The optimizer state as (tensors for safetensors, the rest for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class WorkDir:
    """Resumable checkpoints of a training run."""

    def __init__(self, path, settings: dict):
        self.path = Path(path) if path else None
        self.file = StateFile(self.path and self.path / "state.json", settings, "an interrupted recovery")

    def load(self, model, optimizer) -> TrainState:
        saved = self.file.read()
        if saved is None:
            return TrainState()
        folder = self.path / saved["checkpoint"]
        trainable = load_file(folder / "trainable.safetensors")
        params = dict(model.named_parameters())
        for name, value in trainable.items():
            params[name].data.copy_(value)
        _restore_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), saved["optimizer"])
        torch.set_rng_state(load_file(folder / "rng.safetensors")["cpu"])
        print(f"qrecover: resuming the interrupted recovery in {self.path} at step {saved['step']}", file=sys.stderr)
        return TrainState(step=saved["step"], log=saved["log"], resumed_from=saved["step"])

    def save(self, model, optimizer, state: TrainState) -> None:
        if self.path is None:
            return
        name = f"step-{state.step:06d}"
        folder = self.path / name
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tensors, meta = _optimizer_tensors(optimizer)
        with disk_errors(folder, sum(t.nbytes for t in [*trainable.values(), *tensors.values()])):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            save_file(trainable, str(folder / "trainable.safetensors"))
            save_file(tensors, str(folder / "optimizer.safetensors"))
            save_file({"cpu": torch.get_rng_state()}, str(folder / "rng.safetensors"))
            self.file.write({"step": state.step, "checkpoint": name, "optimizer": meta, "log": state.log})
        for old in self.path.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    @property
    def latest_step(self) -> int | None:
        saved = self.file.read()
        return None if saved is None else saved["step"]


def process_state():
    """This process's place among those `accelerate launch` started (one, when run directly).

    Accelerate's state is a singleton: the first one made decides. Made without cpu=True it ignores
    ACCELERATE_USE_CPU and, on a machine without GPUs, sees a single process where there are several.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def train(model, examples, pad_id: int, config: TrainConfig, objective, settings: dict, work_dir=None, clock=None, progress=True) -> TrainState:
    """Train the parameters of `model` that require grad to lower objective(model, batch); returns
    the final state with its loss log."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # The objective applies the autocast of config.precision itself (losses in float32).
    process_state()
    # The buffers (packed codes, scales, indices) are the same checkpoint in every process and never
    # change, so DDP need not broadcast them before each forward; under CPU bfloat16 autocast that
    # broadcast fails ("Unexpected floating ScalarType in at::autocast::prioritize", torch 2.13).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision="no", kwargs_handlers=[ddp])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise QRecoverError("nothing to train: the model has no trainable parameters (no salient columns?)")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The scale factors of layer.py (relative: about 1) learn at their own rate; nothing decays them.
    scales = [p for n, p in named if n.endswith("scale_factor")]
    groups = [{"params": [p for n, p in named if not n.endswith("scale_factor")]}, {"params": scales, "lr": config.scale_lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay)
    # Every process resumes from the saved state (its optimizer moments and step included); only the
    # main one writes it.
    work = WorkDir(work_dir, settings)
    state = work.load(model, optimizer)
    # The schedule is a pure function of the step: a resumed run starts where the saved one stopped.
    scheduler = cosine_with_warmup(optimizer, math.ceil(config.warmup * config.steps), config.steps, state.step)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    order = BatchOrder(len(examples.items), config.batch_size, config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and accelerator.is_main_process:
        print(f"qrecover: training in {world} processes, {world * config.batch_size * config.grad_accum} examples a step", file=sys.stderr)
    reference = [r["loss"] for r in state.log[:5]]
    bar = tqdm(total=config.steps, initial=state.step, desc="recovery steps", disable=not (progress and accelerator.is_main_process))
    last_saved = work.latest_step
    while state.step < config.steps:
        start, losses, tokens = time.perf_counter(), [], 0
        for micro in range(config.grad_accum):
            position = (state.step * config.grad_accum + micro) * world + rank
            batch = collate([examples.items[i] for i in order.indices(position)], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) * world
            if clock is not None:
                clock.step = position
            with accelerator.accumulate(model):
                loss = objective(model, batch)
                if not torch.isfinite(loss):
                    _stop(f"the loss became {loss.item()} at step {state.step + 1}", last_saved, work)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm) if accelerator.sync_gradients else None
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(accelerator.reduce(loss.detach(), "mean")))
        scheduler.step()
        state.step += 1
        loss = sum(losses) / len(losses)
        if len(reference) >= 5 and loss > config.explode_factor * (sum(reference) / len(reference)):
            _stop(f"the loss exploded to {loss:.3f} at step {state.step} (first steps: {sum(reference) / len(reference):.3f})", last_saved, work)
        reference = reference if len(reference) >= 5 else reference + [loss]
        seconds = time.perf_counter() - start
        state.log.append({
            "step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": tokens, "seconds": round(seconds, 3),
        })
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
        if config.save_every and state.step % config.save_every == 0 and state.step < config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                work.save(accelerator.unwrap_model(model), optimizer, state)
            accelerator.wait_for_everyone()  # no process reads a half-written state
            last_saved = state.step
    bar.close()
    model = accelerator.unwrap_model(model)
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return state


@torch.no_grad()
def mean_loss(model, items: list, pad_id: int, objective, batch_size: int = 4) -> float:
    """The objective of model (in eval mode: no noise) over held-out examples, one example at a time
    weighted equally (examples of one length: the mean over their tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        total += float(objective(model, batch)) * len(chunk)
    model.train(was_training)
    return total / max(len(items), 1)


def cosine_with_warmup(optimizer, warmup: int, total: int, start: int = 0):
    """Linear warm-up to the peak over `warmup` steps (the first step already trains), then cosine decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


def _stop(what: str, last_saved, work: WorkDir):
    where = f"the last good checkpoint is step {last_saved} in {work.path}" if last_saved else "no checkpoint was saved yet"
    raise QRecoverError(f"{what}; stopped ({where}); lower --lr or check the data")


def plot_loss(log: list, path) -> None:
    """A PNG of the training loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
