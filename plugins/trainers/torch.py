"""The PyTorch trainer: one device (CPU or CUDA) or DDP over many processes, AdamW, warmup + cosine, accumulation, clipping,
bf16 autocast on CUDA, optional torch.compile, evaluation, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel

from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, TrainerPlugin, TrainJob
from aic_core.spec import RunSpec
from aic_core.train.checkpoint import model_state, open_checkpoint
from aic_core.train.common import (
    CtrlC,
    MetricsLog,
    Progress,
    Throughput,
    adamw,
    evaluate,
    lr_at,
    resolve_device,
    rng_state,
    set_rng_state,
    train_batch,
)


class TorchTrainerOptions(PluginOptions):
    """Train on one device with plain PyTorch."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = Field(
        False, description="torch.compile the model (faster steps after a compile of a minute or so)."
    )


class TorchTrainer(TrainerPlugin):
    name = "torch"
    Options = TorchTrainerOptions

    def check(self, options: TorchTrainerOptions, spec: RunSpec) -> None:
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(
                f'train.trainer.device: \'{options.device}\' was asked for, but no CUDA GPU is available here. Use "auto" or "cpu".'
            )
        device = resolve_device(options.device)
        if options.precision == "bf16" and device.type != "cuda":
            raise SpecError(
                "train.trainer.precision: 'bf16' needs a CUDA device; on the CPU train in 'fp32' (or leave it 'auto')."
            )

    def device(self, options: TorchTrainerOptions, local_rank: int) -> torch.device:
        return resolve_device(options.device, local_rank)

    def train(self, options: TorchTrainerOptions, job: TrainJob) -> None:
        spec, t, dist = job.spec, job.spec.train, job.dist
        device = dist.device if dist.active else self.device(options, 0)
        bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        model = job.model.to(device)
        model.activation_checkpointing = t.activation_checkpointing  # per-block recompute (aic_core.nn.transformer)
        seq_len = t.seq_len or model.config.block_size
        optimizer = adamw(model, t, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)
        start = 0
        if job.resume_from is not None:
            ckpt = open_checkpoint(job.resume_from)
            model.load_state_dict(ckpt.weights())
            state = ckpt.trainer_state()  # on the CPU: RNG states must be CPU tensors; the optimizer moves its own
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ranks = state.get("rng_ranks")
            if ranks is not None and len(ranks) == dist.world_size:
                set_rng_state(ranks[dist.rank])
            else:
                set_rng_state(state["rng"])
                if dist.world_size != (len(ranks) if ranks else 1):
                    warnings.warn(
                        f"--resume: {ckpt.path} was written by {len(ranks) if ranks else 1} process(es) and this run has {dist.world_size}: "
                        f"the weights, optimizer, schedule and data order continue exactly, the per-rank random streams (dropout) restart.",
                        stacklevel=2,
                    )
                    if dist.rank:
                        torch.manual_seed(spec.seed + dist.rank + ckpt.step)
            start = ckpt.step
        # DDP averages gradients over ranks; it broadcasts rank 0's weights at construction, so every replica starts equal.
        ddp = (
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if dist.active
            else None
        )
        forward = torch.compile(ddp or model) if options.compile else (ddp or model)
        end = min(t.steps, job.stop_at or t.steps)
        micro_steps = t.grad_accum // dist.world_size  # this rank's share of the step's micro-batches
        tokens_per_step = t.batch_size * t.grad_accum * seq_len

        saved, metrics_step = None, None  # the step last checkpointed; the step `metrics` were measured at

        def checkpoint(step: int) -> None:
            nonlocal saved
            if dist.is_main:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                }
                weights = model_state(model)
            else:  # rank 0 writes; the others only add their random state
                trainer_state, weights = {"rng": rng_state()}, None
            # Validation metrics go with the checkpoint only if measured at its step (else the eval stage measures).
            job.save_checkpoint(step, weights, trainer_state, metrics if metrics_step == step else None)
            saved = step

        log = MetricsLog.for_run(job.run_dir, t, enabled=dist.is_main)
        if start:
            log.write(event="resume", step=start)
        bar = Progress(end, start, enabled=dist.is_main)
        model.train()
        meter = Throughput(tokens_per_step, start)
        metrics: dict[str, float] = {}
        done = start
        ctrl_c = CtrlC()
        try:
            ctrl_c.__enter__()
            for step in range(start, end):
                loss_sum = torch.zeros((), device=device)
                for micro in range(micro_steps):
                    x, y = train_batch(job.train_data, spec, step, micro, seq_len, device, dist.rank, dist.world_size)
                    # Gradients are averaged over ranks once a step, on the last micro-batch, not on each one.
                    sync = ddp is None or micro == micro_steps - 1
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        with autocast:
                            loss = forward(x, y)
                        (loss / micro_steps).backward()
                    loss_sum += loss.detach()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % t.log_every == 0 or done == end:
                    loss_value = dist.mean(loss_sum).item() / micro_steps  # syncs: only on log steps
                    tok_s = meter.rate(done)
                    log.write(step=done, loss=loss_value, lr=lr, tokens_per_s=round(tok_s, 1))
                    bar.log(done, loss_value, lr, tok_s)
                bar.update()
                if spec.eval.every and done % spec.eval.every == 0 and done < t.steps:
                    with meter.paused():
                        metrics, metrics_step = (
                            evaluate(model, job.val_data, spec, seq_len, device, autocast, dist),
                            done,
                        )
                    log.write(step=done, **metrics)
                    bar.write(f"step {done}: val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f}")
                if t.checkpoint_every and done % t.checkpoint_every == 0 and done < end:
                    with meter.paused():
                        checkpoint(done)
                if ctrl_c.agreed(dist) and done < end:
                    break
            if ctrl_c.requested and done < end:  # Ctrl-C: keep the steps done so far, then stop
                if done > start and saved != done:
                    checkpoint(done)
                if saved is not None:
                    bar.write(f"interrupted after step {done}: saved checkpoint step-{saved}", file=sys.stderr)
                raise KeyboardInterrupt
            if end == t.steps:
                metrics, metrics_step = evaluate(model, job.val_data, spec, seq_len, device, autocast, dist), end
                log.write(step=end, **metrics)
                bar.write(
                    f"step {end}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  val_bpb {metrics['val_bpb']:.4f}"
                )
            if end > start or job.resume_from is None:
                checkpoint(end)
            if ctrl_c.requested:  # Ctrl-C during the last step or the final evaluation: training is complete and saved
                raise KeyboardInterrupt
        finally:
            ctrl_c.__exit__()
            bar.close()
            log.close()


@hookimpl
def aic_register_trainers(register):
    register(TorchTrainer)
