"""The PyTorch trainer: one device (CPU or CUDA), AdamW, warmup + cosine, accumulation, clipping,
bf16 autocast on CUDA, optional torch.compile, evaluation, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Literal

import torch
from pydantic import Field

from aic_core.checkpoint import model_state, open_checkpoint
from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, TrainerPlugin, TrainJob
from aic_core.spec import RunSpec
from aic_core.training import CtrlC, MetricsLog, Progress, evaluate, lr_at, param_groups, resolve_device, rng_state, set_rng_state, train_batch


class TorchTrainerOptions(PluginOptions):
    """Train on one device with plain PyTorch."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model (faster steps after a compile of a minute or so).")


class TorchTrainer(TrainerPlugin):
    name = "torch"
    Options = TorchTrainerOptions

    def check(self, options: TorchTrainerOptions, spec: RunSpec) -> None:
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(f"train.trainer.device: '{options.device}' was asked for, but no CUDA GPU is available here. Use \"auto\" or \"cpu\".")
        device = resolve_device(options.device)
        if options.precision == "bf16" and device.type != "cuda":
            raise SpecError("train.trainer.precision: 'bf16' needs a CUDA device; on the CPU train in 'fp32' (or leave it 'auto').")

    def train(self, options: TorchTrainerOptions, job: TrainJob) -> None:
        spec, t = job.spec, job.spec.train
        device = resolve_device(options.device)
        bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        model = job.model.to(device)
        seq_len = t.seq_len or model.config.block_size
        optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda"
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)
        start = 0
        if job.resume_from is not None:
            ckpt = open_checkpoint(job.resume_from)
            model.load_state_dict(ckpt.weights())
            state = ckpt.trainer_state()  # on the CPU: RNG states must be CPU tensors; the optimizer moves its own
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start = ckpt.step
        forward = torch.compile(model) if options.compile else model
        end = min(t.steps, job.stop_at or t.steps)
        tokens_per_step = t.batch_size * t.grad_accum * seq_len

        saved, metrics_step = None, None  # the step last checkpointed; the step `metrics` were measured at

        def checkpoint(step: int) -> None:
            nonlocal saved
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
            # Validation metrics go with the checkpoint only if measured at its step (else the eval stage measures).
            job.save_checkpoint(step, model_state(model), trainer_state, metrics if metrics_step == step else None)
            saved = step

        log = MetricsLog.for_run(job.run_dir, t)
        if start:
            log.write(event="resume", step=start)
        bar = Progress(end, start)
        model.train()
        tick, last_logged = time.perf_counter(), start
        metrics: dict[str, float] = {}
        done = start
        ctrl_c = CtrlC()
        try:
            ctrl_c.__enter__()
            for step in range(start, end):
                loss_sum = torch.zeros((), device=device)
                for micro in range(t.grad_accum):
                    x, y = train_batch(job.train_data, spec, step, micro, seq_len, device)
                    with autocast:
                        loss = forward(x, y)
                    (loss / t.grad_accum).backward()
                    loss_sum += loss.detach()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % t.log_every == 0 or done == end:
                    loss_value = loss_sum.item() / t.grad_accum  # syncs: only on log steps
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (done - last_logged) / max(now - tick, 1e-9)
                    tick, last_logged = now, done
                    log.write(step=done, loss=loss_value, lr=lr, tokens_per_s=round(tok_s, 1))
                    bar.log(done, loss_value, lr, tok_s)
                bar.update()
                if spec.eval.every and done % spec.eval.every == 0 and done < t.steps:
                    metrics, metrics_step = evaluate(model, job.val_data, spec, seq_len, device, autocast), done
                    log.write(step=done, **metrics)
                    bar.write(f"step {done}: val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f}")
                if t.checkpoint_every and done % t.checkpoint_every == 0 and done < end:
                    checkpoint(done)
                if ctrl_c.requested and done < end:
                    break
            if ctrl_c.requested and done < end:  # Ctrl-C: keep the steps done so far, then stop
                if done > start and saved != done:
                    checkpoint(done)
                if saved is not None:
                    bar.write(f"interrupted after step {done}: saved checkpoint step-{saved}", file=sys.stderr)
                raise KeyboardInterrupt
            if end == t.steps:
                metrics, metrics_step = evaluate(model, job.val_data, spec, seq_len, device, autocast), end
                log.write(step=end, **metrics)
                bar.write(f"step {end}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  val_bpb {metrics['val_bpb']:.4f}")
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
