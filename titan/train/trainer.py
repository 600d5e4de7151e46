"""The training loop. Everything is built by `build_*` functions, one module per concern;
the step itself (`train_step`) is the few lines below."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from titan.checkpoint import Checkpointer, restore
from titan.eval.loop import DownstreamEval
from titan.config.schema import NanCheck, TrainConfig
from titan.fault_tolerance import build_fault_tolerance
from titan.metrics import MetricsLogger, Throughput, peak_memory_gib, reset_peak_memory
from titan.profiling import NonFiniteLoss, StepProfiler
from titan.train.build import Components, build_components
from titan.train.env import RankEnv
from titan.train.interrupt import stop_agreed
from titan.train.summary import startup_summary
from titan.train.spike_guard import SpikeGuard
from titan.train.weights import export_hf, load_initial_weights, save_seed_checkpoint

log = logging.getLogger("titan")


class Trainer:
    def __init__(self, cfg: TrainConfig, env: RankEnv):
        self.cfg, self.env = cfg, env
        self.c: Components = build_components(cfg, env)
        self.checkpointer = Checkpointer(cfg.checkpoint, cfg.run_dir)
        resume = self.checkpointer.resume_path()
        adapters_only = self.c.state.model_keys is not None  # LoRA: the base is not in checkpoints
        if cfg.checkpoint.initial_load and (resume is None or adapters_only):
            load_initial_weights(self.c.model, cfg.checkpoint.initial_load, self.c.args, strict=not adapters_only)
        if resume is not None:
            restore(self.c.state, resume)
            log.info("resumed from %s at step %d", resume, self.c.state.step)
        self.ft = build_fault_tolerance(cfg, env, self.c.state)  # None unless fault_tolerance=torchft
        if self.ft is not None and resume is not None:
            self.ft.resumed(self.c.state.step, resume)
        self.metrics = MetricsLogger(cfg, enabled=env.is_main)
        self.throughput = Throughput.for_device(self.c.flops_per_token, env.world_size, env.device, cfg.logging.peak_tflops)
        # Tokens per optimizer step across the whole job.
        self.tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
        self.accum_steps = self.c.accum_steps
        self.profiler = StepProfiler(cfg.profiling, cfg.run_dir, env.rank, env.device)
        if env.is_main:  # what is about to be trained, before step 1 (which may take long)
            log.info(startup_summary(cfg, self.c, env.world_size, env.device, resume))
        self.spike_guard = SpikeGuard(cfg.training.spike_guard)
        self.downstream = DownstreamEval(cfg, self.c, env)  # eval.interval: lm-eval tasks in the loop

    # ------------------------------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.c.loss(logits, labels)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the global batch; returns the global mean loss and grad norm."""
        model, opt, pipe = self.c.model, self.c.optimizer, self.c.pipeline
        total = torch.zeros((), device=self.env.device)
        self.c.set_loss_divisor(batches)  # SFT: trained tokens of the global batch
        for inputs, labels in batches:  # gradient accumulation over micro-batches
            inputs, labels, positions = self.c.local_inputs(inputs, labels)
            kwargs = self.c.model_kwargs(inputs, positions)
            if pipe is not None:  # the schedule runs forward and backward over the stages
                loss = pipe.step(inputs, labels, **kwargs)  # on the last stage only; None elsewhere
                total = None if loss is None else total + loss
                continue
            with self.c.forward_context():
                loss = self.loss_fn(model(inputs, **kwargs), labels)
                self.c.with_aux_loss(loss).backward()
            total += self.c.parallel.plain_loss(loss.detach())
        if self.ft is not None:  # mean over the live replica groups
            self.ft.average_gradients(model)
        grad_norm = float(self.c.clip_grad_norm(self.cfg.optim.max_norm))
        loss = self.c.mean_over_dp(total)
        committed = True
        if self.ft is not None:
            loss, committed = self.ft.mean(loss, self.env.device), self.ft.should_commit()
        # profiling.nan_check=skip, training.spike_guard, or torchft's quorum said no: drop this update
        if self.non_finite(loss, grad_norm) or self.spike_guard.should_skip(self.c.state.step, loss, grad_norm) or not committed:
            opt.zero_grad(set_to_none=True)
            return loss, grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.c.after_optimizer_step()
        return loss, grad_norm

    def non_finite(self, loss: float, grad_norm: float) -> bool:
        """Check the global loss and grad norm (every rank sees the same values, so every rank
        decides alike): raise for nan_check=stop, True for skip, False when finite or off."""
        check = self.cfg.profiling.nan_check
        if check is NanCheck.off or (math.isfinite(loss) and math.isfinite(grad_norm)):
            return False
        step = self.c.state.step
        if check is NanCheck.stop:
            raise NonFiniteLoss(
                f"loss {loss} / grad norm {grad_norm} at step {step}: stopped "
                "(profiling.nan_check=stop); the last checkpoint before it is intact"
            )
        log.warning("step %d: loss %s, grad norm %s: update skipped (profiling.nan_check=skip)", step, loss, grad_norm)
        return True

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.c.model.eval()
        total, count = torch.zeros((), device=self.env.device), 0
        # `val_batches` global batches: every rank its slice of each, so the mean does not depend
        # on the layout (each micro-batch holds the same number of tokens).
        for inputs, labels in self.c.val_batches(self.cfg.training.val_batches * self.accum_steps):
            inputs, labels, positions = self.c.local_inputs(inputs, labels)
            kwargs = self.c.model_kwargs(inputs, positions)
            masked = self.c.masked_labels  # SFT: the mean over the trained tokens of every batch
            if self.c.pipeline is not None:  # forward stage by stage; the mean reaches every rank
                total += self.c.pipeline.eval_loss(inputs, labels, **kwargs) * (self.c.pipeline.n_eval_microbatches(inputs) if masked else 1)
                count += int((labels != -100).sum()) if masked else 1
                continue
            with self.c.forward_context():
                logits = self.c.model(inputs, **kwargs)
                ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum" if masked else "mean")
            total += self.c.parallel.plain_loss(ce)
            count += int((labels != -100).sum()) if masked else 1
        self.c.model.train()
        if self.c.masked_labels:
            val_loss = self.c.mean_over_dp(total) / max(self.c.mean_over_dp(torch.tensor(float(count), device=self.env.device)), 1e-9)
        else:
            val_loss = self.c.mean_over_dp(total / max(count, 1))
        if self.ft is not None:  # each replica group evaluated its slice of the val batches
            val_loss = self.ft.mean(val_loss, self.env.device)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def save_seed(self) -> None:
        save_seed_checkpoint(self.c.model, self.c.args, self.cfg.run_dir)

    # ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.c.state
        last, interval = cfg.training.steps, cfg.logging.interval
        losses, last_val, first_loss = [], None, None
        reset_peak_memory(self.env.device)
        started = time.perf_counter()
        while state.step < last:
            if stop_agreed():  # Ctrl-C on any rank: every rank stops here, at the same step
                self.checkpointer.save_on_interrupt(state, state.step)
                break
            if self.ft is not None:  # the quorum for this step; a group behind heals here
                self.ft.start_step()
            state.step += 1
            self.profiler.step_begin(state.step)
            t0 = time.perf_counter()
            batches = [self.c.loader.next_batch() for _ in range(self.accum_steps)]
            data_s = time.perf_counter() - t0
            loss, grad_norm = self.train_step(batches)
            lr = self.c.scheduler.get_last_lr()[0]  # the LR this step used (step() moves on)
            self.c.scheduler.step()
            self.throughput.add(self.tokens_per_step, data_s, time.perf_counter() - t0)
            self.profiler.step_end(state.step)
            losses.append(loss)
            first_loss = loss if first_loss is None else first_loss
            if state.step % interval == 0 or state.step == last or state.step == 1:
                record = {"step": state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr}
                record.update(self.throughput.measure())
                if self.ft is not None:
                    record.update(self.ft.metrics())
                record.update(self.c.model_metrics())
                record.update(
                    checkpoint_block_s=self.checkpointer.take_blocked(),
                    memory_gib=peak_memory_gib(self.env.device),
                    tokens_seen=state.step * self.tokens_per_step,
                    elapsed_s=time.perf_counter() - started,
                    skipped_steps=self.spike_guard.skipped,
                )
                if hasattr(self.c.loader, "source_tokens"):  # data.mix: tokens_seen/NAME per source
                    record.update(self.c.loader.source_tokens(self.c.loader.state_dict()))
                self.metrics.log(record)
            if cfg.training.val_interval and (state.step % cfg.training.val_interval == 0 or state.step == last):
                t_val = time.perf_counter()
                last_val = self.validate()
                self.throughput.add_validation(time.perf_counter() - t_val)
                self.metrics.log({"step": state.step, **last_val, "tokens_seen": state.step * self.tokens_per_step})
            self.downstream(state.step, last, state.step * self.tokens_per_step, self.metrics)
            self.checkpointer.poll()
            if self.checkpointer.should_save(state.step, last):
                self.checkpointer.save(state.state_dict(), state.step)
        self.checkpointer.close()
        if self.ft is not None:
            self.ft.close()
        self.profiler.close(state.step)
        if cfg.checkpoint.export_hf:
            export_hf(self.c.model, self.c.args, cfg.run_dir, self.c.tokenizer, cfg.checkpoint.export_dtype)
        summary = {
            "steps": state.step,
            "first_loss": first_loss,
            "final_loss": losses[-1] if losses else None,
            "min_loss": min(losses) if losses else None,
            "final_val_loss": last_val["val_loss"] if last_val else None,
            "tokens_seen": state.step * self.tokens_per_step,
            "wall_s": time.perf_counter() - started,
            "params": self.c.n_params,
            "active_params": self.c.n_active_params,
            "flops_per_token": self.c.flops_per_token,
            "world_size": self.env.world_size,
            "skipped_steps": self.spike_guard.skipped,
            **self.downstream.last,
        }
        self.metrics.close(summary)
        return summary
