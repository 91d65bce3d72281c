"""One training loop for every stage, on Hugging Face `accelerate`.

The same code runs on this CPU, on one GPU (bf16), or on several GPUs and machines through `accelerate launch`
(DeepSpeed / FSDP come from accelerate's own config); we write no distributed code. A stage supplies the model,
the parameters to train, a dataset, a collate function and a loss function; the loop does the rest:

    out/
      log.jsonl                 one JSON object per logged step (loss, lr, samples/s, stage metrics)
      checkpoints/step-000200/  accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json

Resume picks the newest checkpoint and continues from its step with the same data order (the sampler is seeded
per epoch, and the batches of the interrupted epoch that were already seen are skipped).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainConfig:
    out: str
    max_steps: int
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    save_every: int = 100
    log_every: int = 1
    seed: int = 42
    num_workers: int = 0
    progress: bool = True
    # "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16" also on a CPU with bf16 instructions (AVX512-BF16/AMX:
    # ~1.5x faster for the phantom-small stages here); "no": fp32. Weights and optimizer state stay fp32.
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"TrainConfig.mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    step: int
    resumed_from: int
    losses: list[float]
    log: Path


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total` (the official schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def latest_checkpoint(out: Path) -> Optional[Path]:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def _epoch_loader(dataset: Dataset, cfg: TrainConfig, collate: Callable, epoch: int) -> DataLoader:
    """The loader of one epoch. The order is a permutation drawn from (seed, epoch) alone and handed over as a
    sequential subset, so accelerate's sampler wrapping (which re-seeds random samplers from its own counters)
    cannot change it and a resumed run sees exactly the batches the interrupted run would have seen."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
    return DataLoader(Subset(dataset, order), batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                      num_workers=cfg.num_workers, drop_last=len(dataset) >= cfg.batch_size)


def run(model: nn.Module, params: Iterable[nn.Parameter] | Iterable[dict], dataset: Dataset, collate: Callable,
        loss_fn: LossFn, cfg: TrainConfig, *, resume: bool = True, accelerator=None) -> TrainResult:
    """Train `params` of `model` for `cfg.max_steps` optimizer steps (resuming when a checkpoint exists).

    `params` is a list of parameters (all at cfg.lr) or of optimizer groups {"params": [...], "lr": ...}.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        # cpu=True without CUDA: accelerate only treats several CPU processes (torchrun) as one gloo job when
        # told it runs on CPU; alone it changes nothing
        accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                                  cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in params]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, cfg.max_steps, warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, start = 0, 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    batches_per_epoch = max(1, len(dataset) // cfg.batch_size)
    updates_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    log = out / "log.jsonl"
    losses: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=step, desc=out.name, disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    t0, seen = time.perf_counter(), 0
    while step < cfg.max_steps:
        epoch, done_in_epoch = divmod(step, updates_per_epoch)
        loader = accelerator.prepare(_epoch_loader(dataset, cfg, collate, epoch))
        if done_in_epoch:
            loader = accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum)
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():  # also covers loss functions that call submodules directly
                    loss, metrics = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen += cfg.batch_size
            if not accelerator.sync_gradients:
                continue
            step += 1
            value = float(loss.detach())
            losses.append(value)
            rate = seen / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.2f}")
            if accelerator.is_main_process and step % cfg.log_every == 0:
                record = {"step": step, "loss": value, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate,
                          **{k: float(v) for k, v in metrics.items()}}
                with log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, out, step, cfg)
            if step >= cfg.max_steps:
                break
    bar.close()
    return TrainResult(step=step, resumed_from=start, losses=losses, log=log)


def save_checkpoint(accelerator, out: Path, step: int, cfg: TrainConfig) -> Path:
    """accelerate state + trainer_state.json, written under a temporary name and renamed when complete."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()  # every process writes its own files (RNG state) into tmp
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # all of them done before the rename
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final
