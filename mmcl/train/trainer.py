"""The training recipe: setup -> train -> save_checkpoint -> cleanup (torchtune's shape, nanoGPT's
readability). The data flows one way: shards -> stream -> batch -> model -> loss -> step.

Accelerate owns devices, processes and mixed precision; the model and optimizer go through
`accelerator.prepare`, the WebDataset loader does not (it already splits shards by rank and worker).
Resume is step-exact with the same processes and loader workers: weights, optimizer, per-rank RNG and
per-rank data positions are restored, and the learning rate is a pure function of the step. With other
counts the data stream continues from the checkpoint's ledger of consumed samples (mmcl.data.progress):
every sample of the open epoch is still seen exactly once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from mmcl.checkpoint_folder import CHECKPOINTS
from mmcl.config import TrainConfig
from mmcl.data import build_loader
from mmcl.data.device_transform import batch_to_model_input, choose_image_path
from mmcl.data.pipeline import read_options
from mmcl.data.progress import DataProgress, SampleLedger
from mmcl.errors import RunFailed, UsageError, describe_load_error
from mmcl.host_memory import keep_freed_memory
from mmcl.losses import contrastive_loss, sigmoid_loss
from mmcl.models import build_model
from mmcl.models.weights import load_weights
from mmcl.noise.weighting import NoiseWeighting
from mmcl.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmcl.train.metrics_sink import (
    METRICS,
    SAMPLE_KEYS,
    TENSORBOARD,
    MetricsSink,
    SampleKeyLog,
    keep_sample_logs_until,
)
from mmcl.train.optim import lr_at, param_groups, set_lr
from mmcl.train.preflight import preflight
from mmcl.train.state import TrainState
from mmcl.train.threads import set_cpu_threads


class Trainer:
    """One training run as described by a TrainConfig."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None) -> None:
        self.cfg = config
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.train.mixed_precision,
        )
        self.output = Path(config.run.output_dir)
        self.state = TrainState()
        self.stop_requested = False
        self._previous_handlers: dict = {}
        self.metrics: MetricsSink | None = None
        self.sample_log: SampleKeyLog | None = None
        self._pair_weights: torch.Tensor | None = None  # the last step's weights of this rank's pairs
        self._last_loss = float("nan")

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the config's data and paths (preflight), then build model, optimizer and data stream;
        restore a checkpoint when resuming."""
        cfg, acc = self.cfg, self.accelerator
        sources = preflight(cfg, acc.num_processes)
        if acc.device.type == "cpu":
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
            threads = set_cpu_threads(cfg.data.workers, local_processes)
            if threads is not None:
                acc.print(
                    f"OMP_NUM_THREADS unset: {threads} torch thread(s) per process beside "
                    f"{cfg.data.workers} loader worker(s); set OMP_NUM_THREADS to choose"
                )
            keep_freed_memory()  # the step's activations stay in the heap for the next step
        set_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model)
        optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
        )
        checkpoint = self._find_checkpoint()
        if checkpoint is not None:
            load_weights(self.model, checkpoint.model_state)
            optimizer.load_state_dict(checkpoint.optimizer_state)
            self.state = checkpoint.train_state
        self.weighter = NoiseWeighting(cfg.noise, self.model, loss=self._loss)
        if checkpoint is not None:
            self.weighter.load_state_dict(checkpoint.extra, checkpoint.extra_tensors)
        self.weighter.to(acc.device)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        data_resume = None
        if checkpoint is not None and self.state.data:
            data_resume = DataProgress.from_state_dict(self.state.data)
            self._fit_batch_to_layout(data_resume)
        # the model without Accelerate's wrappers (DDP, DeepSpeed), once: unwrap_model walks every module
        self.unwrapped = unwrapped = acc.unwrap_model(self.model)
        # audio clips are cropped/padded by the data pipeline itself (seeded per sample)
        transform = unwrapped.media_transform(train=True) if cfg.model.modality == "image" else None
        self.device_images = None
        if transform is not None:
            self.device_images = choose_image_path(cfg.data.image_on_device, acc.device.type, transform)
            if self.device_images is not None and self.device_images.resize_on_device:
                acc.print(f"data.image_on_device: images are resized and normalised on {acc.device.type}")
        self.loader = build_loader(
            cfg.data,
            modality=cfg.model.modality,
            media_transform=transform,
            tokenizer=unwrapped.tokenizer,
            rank=acc.process_index,
            world_size=acc.num_processes,
            resume=data_resume,
            sources=sources,
            device_images=self.device_images,
            pin_memory=acc.device.type == "cuda",  # lets the batch's copy to the GPU overlap the step
        )
        self.stream = stream = self.loader.dataset
        self.data_state = stream.initial_state()
        self.progress = stream.progress  # the main process records every rank's into it at each checkpoint
        # different augmentations per rank; a replayed resume restores each rank's generators as they were
        set_seed(
            (cfg.run.seed + acc.process_index + (self.state.step * 1000 if stream.elastic else 0)) % 2**32
        )
        if checkpoint is not None:
            if stream.elastic is None and len(checkpoint.rng) == acc.num_processes:
                set_rng_state(checkpoint.rng[acc.process_index])
            elif stream.elastic is not None:
                old = f"{data_resume.world_size} x {data_resume.num_workers}"
                acc.print(
                    f"elastic resume from {old} to {acc.num_processes} x {stream.num_workers} process(es) x "
                    "loader worker(s): epoch "
                    f"{stream.elastic.start_epoch} continues from the checkpoint's ledger "
                    f"({stream.elastic.ledger.samples()} samples consumed), each remaining sample once"
                )
            acc.print(f"resumed from {checkpoint.path} at step {self.state.step}")
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            if cfg.train.resume == "never":
                _set_aside_earlier_run(self.output, acc.print)
            (self.output / "config.json").write_text(cfg.model_dump_json(indent=1))
        self.metrics = MetricsSink(self.output, start_step=self.state.step, main_process=acc.is_main_process)
        if cfg.train.log_sample_keys:
            if acc.is_main_process:
                keep_sample_logs_until(self.output, self.state.step)
            acc.wait_for_everyone()
            self.sample_log = SampleKeyLog(self.output, acc.process_index)
        # restored by cleanup(): a process that trains in-process (a notebook, a test) and later forks
        # workers must not leave them a SIGTERM that only sets a flag (multiprocessing.Pool.terminate hangs)
        self._previous_handlers = {
            sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _fit_batch_to_layout(self, saved: DataProgress) -> None:
        """train.elastic_batch=global on another number of processes: data.batch_size becomes the saved global
        batch over processes x accumulation steps, so the steps and the schedule keep their meaning."""
        cfg, n = self.cfg, self.accelerator.num_processes
        if cfg.train.elastic_batch != "global" or saved.world_size == n or saved.global_batch is None:
            return
        per_step = n * cfg.train.accumulation_steps
        if saved.global_batch % per_step:
            raise UsageError(
                f"train.elastic_batch=global: the checkpoint's global batch {saved.global_batch} does not "
                f"split over {n} processes x {cfg.train.accumulation_steps} accumulation steps; change "
                "train.accumulation_steps, or set train.elastic_batch=per_process to keep data.batch_size"
            )
        cfg.data.batch_size = saved.global_batch // per_step
        self.accelerator.print(
            f"train.elastic_batch=global: data.batch_size {cfg.data.batch_size} per process keeps the global "
            f"batch at {saved.global_batch} on {n} process(es)"
        )

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _find_checkpoint(self):
        resume = self.cfg.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.output / CHECKPOINTS, warn=self.accelerator.print)
        try:  # a complete checkpoint folder (preflight checked)
            return load_checkpoint(Path(resume))
        except Exception as err:  # unreadable or refused file (e.g. a pickle that weights_only rejects)
            raise UsageError(f"train.resume={resume}: cannot load it: {describe_load_error(err)}") from None

    # ----------------------------------------------------------------- the step
    def _loss(
        self, media_features, text_features, logit_scale, logit_bias, weights=None, soft_targets=None
    ) -> dict:
        cfg = self.cfg.loss
        unlearn = self.cfg.noise.unlearn_weight if weights is not None else 0.0
        if cfg.kind == "siglip":
            return sigmoid_loss(
                media_features,
                text_features,
                logit_scale,
                logit_bias,
                weights,
                gather=cfg.gather,
                unlearn_weight=unlearn,
            )
        return contrastive_loss(
            media_features,
            text_features,
            logit_scale,
            weights,
            gather=cfg.gather,
            local_loss=cfg.local_loss,
            soft_targets=soft_targets,
            unlearn_weight=unlearn,
        )

    def _optimizer_step(self, batches: list[dict]) -> tuple[torch.Tensor, int, bool]:
        """One update: forward and backward over the accumulated batches, then, when every rank's loss is
        finite, gradient clipping, the optimizer step and the weighting's after_update (the teacher's EMA);
        gradients are cleared either way.
        Returns (loss, negatives per pair, whether the update was applied)."""
        cfg, acc = self.cfg, self.accelerator
        loss, negatives = self._train_step(batches)
        finite = torch.isfinite(loss).float()
        all_finite = acc.reduce(finite.to(acc.device), reduction="sum").item() == acc.num_processes
        if all_finite:
            if cfg.optim.grad_clip is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.weighter.after_update(self.unwrapped)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, negatives, all_finite

    def _train_step(self, batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Forward + backward for one optimizer step; returns the (detached) loss and how many negatives
        each sample was contrasted with (global batch - 1 when features are gathered across processes)."""
        device = self.accelerator.device
        # media to the device; with data.image_on_device the crops are resized and normalised there, once
        # per micro-batch, before the forward passes and the weighting's teacher use them
        batches = [batch_to_model_input(b, device, self.device_images) for b in batches]
        if len(batches) == 1:
            batch = batches[0]
            with self.accelerator.autocast():
                out = self.forward(batch["media"].to(device), batch["text"].to(device))
                weights, soft = self.weighter.weigh(self.state.step, batches, out)
                self._pair_weights = weights
                loss = self._loss(
                    out["media_features"],
                    out["text_features"],
                    out["logit_scale"],
                    out["logit_bias"],
                    weights,
                    soft,
                )
            self.accelerator.backward(loss["loss"])
            return loss["loss"].detach(), loss["logits_per_media"].shape[1] - 1
        return self._train_step_cached(batches)

    def _train_step_cached(self, batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Gradient accumulation that keeps every accumulated sample as a negative (feature caching, as in
        GradCache): embed all micro-batches without graph, compute the loss over all of them, then re-run
        each micro-batch with graph and back-propagate the cached feature gradients. RNG is replayed so the
        second pass sees the same augmentation (e.g. SpecAugment masks) as the first."""
        device = self.accelerator.device
        rng_before, media_feats, text_feats = [], [], []
        with torch.no_grad(), self.accelerator.autocast():
            for batch in batches:
                rng_before.append(torch.get_rng_state())
                out = self.forward(batch["media"].to(device), batch["text"].to(device))
                media_feats.append(out["media_features"].float())
                text_feats.append(out["text_features"].float())
        media = torch.cat(media_feats).requires_grad_(True)
        text = torch.cat(text_feats).requires_grad_(True)
        scale = out["logit_scale"].detach().float().requires_grad_(True)
        bias = out["logit_bias"]
        bias = bias.detach().float().requires_grad_(True) if bias is not None else None
        features = {"media_features": media, "text_features": text, "logit_scale": scale, "logit_bias": bias}
        weights, soft = self.weighter.weigh(self.state.step, batches, features)
        self._pair_weights = weights
        loss = self._loss(media, text, scale, bias, weights, soft)
        leaves = [media, text, scale] + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(loss["loss"], leaves)
        grad_media, grad_text, grad_scale = grads[0].split(len(batches[0]["keys"])), grads[1], grads[2]
        grad_text = grad_text.split(len(batches[0]["keys"]))
        grad_bias = grads[3] if bias is not None else None
        for i, batch in enumerate(batches):
            torch.set_rng_state(rng_before[i])
            last = i == len(batches) - 1
            context = self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext()
            with context, self.accelerator.autocast():
                out = self.forward(batch["media"].to(device), batch["text"].to(device))
                surrogate = (out["media_features"].float() * grad_media[i]).sum()
                surrogate = surrogate + (out["text_features"].float() * grad_text[i]).sum()
                surrogate = surrogate + out["logit_scale"].float() * grad_scale / len(batches)
                if grad_bias is not None:
                    surrogate = surrogate + out["logit_bias"].float() * grad_bias / len(batches)
            self.accelerator.backward(surrogate)
        return loss["loss"].detach(), loss["logits_per_media"].shape[1] - 1

    # ----------------------------------------------------------------- the loop
    def train(self) -> TrainState:
        """Run until train.steps (or a stop signal); checkpoints every train.checkpoint_every steps."""
        cfg, acc = self.cfg, self.accelerator
        total = cfg.train.steps
        batches_iter = iter(self.loader)
        bar = tqdm(
            total=total,
            initial=self.state.step,
            desc="train",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            # a log file gets a line every 30 s, not every step
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        window = {"loss": 0.0, "count": 0, "samples": 0, "wait": 0.0, "start": time.perf_counter()}
        bad_in_a_row = 0
        stop_at = total
        if cfg.train.max_steps_per_run is not None:
            stop_at = min(total, self.state.step + cfg.train.max_steps_per_run)
        self.model.train()
        while self.state.step < stop_at:
            step = self.state.step
            lr = lr_at(
                step,
                base_lr=cfg.optim.lr,
                warmup_steps=cfg.optim.warmup_steps,
                total_steps=total,
                schedule=cfg.optim.schedule,
                min_lr_ratio=cfg.optim.min_lr_ratio,
            )
            set_lr(self.optimizer, lr)
            wait_start = time.perf_counter()
            batches = [next(batches_iter) for _ in range(cfg.train.accumulation_steps)]
            window["wait"] += time.perf_counter() - wait_start
            for batch in batches:
                self.data_state.update(batch)

            loss, negatives, all_finite = self._optimizer_step(batches)
            # the workers may fill the batches' memory again: the step's .item() waited for the device, so
            # no copy from it is still running
            self.stream.give_back(batches)
            if all_finite:
                bad_in_a_row = 0
            else:
                self.state.skipped_steps += 1
                bad_in_a_row += 1
                acc.print(f"step {step}: non-finite loss ({loss.item()}), update skipped")
                if bad_in_a_row > cfg.train.max_bad_steps:
                    raise RunFailed(
                        f"{bad_in_a_row} non-finite losses in a row: lower optim.lr or check the data"
                    )

            local_samples = sum(len(b["keys"]) for b in batches)
            self.state.step += 1
            if self.sample_log is not None:
                self.sample_log.write(self.state.step, batches, self._pair_weights)
            self.state.samples_seen += local_samples * acc.num_processes
            window["samples"] += local_samples * acc.num_processes
            if all_finite:
                window["loss"] += loss.item()
                window["count"] += 1
            bar.update(1)
            if self.state.step % cfg.train.log_every == 0 or self.state.step == total:
                self._log(window, lr, batches, negatives)
                window = {"loss": 0.0, "count": 0, "samples": 0, "wait": 0.0, "start": time.perf_counter()}
                bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{lr:.2e}")

            asked = torch.tensor(float(self.stop_requested), device=acc.device)
            stop = acc.reduce(asked, reduction="sum").item() > 0  # any rank's signal stops every rank
            at_end = self.state.step in (total, stop_at)
            every = cfg.eval.every_steps
            if every and (self.state.step % every == 0 or self.state.step == total):
                self.evaluate()
            if self.state.step % cfg.train.checkpoint_every == 0 or at_end or stop:
                self.save_checkpoint()
            if stop:
                acc.print(f"stop requested: saved step {self.state.step}; re-run the same command to resume")
                break
        bar.close()
        return self.state

    def _log(self, window: dict, lr: float, batches: list[dict], negatives: int) -> None:
        acc = self.accelerator
        count = torch.tensor([window["loss"], float(window["count"])], device=acc.device)
        count = acc.reduce(count, reduction="sum")
        mean_loss = (count[0] / count[1]).item() if count[1] > 0 else float("nan")
        # every reader of this rank (a batch only carries its own reader's count), summed over ranks
        local_skipped = self.data_state.skipped()
        skipped = acc.reduce(torch.tensor(float(local_skipped), device=acc.device), reduction="sum").item()
        self.state.bad_samples = int(skipped)
        self._last_loss = mean_loss
        elapsed = time.perf_counter() - window["start"]
        logit_scale, _ = self.unwrapped.logit_params()
        record = {
            "loss": mean_loss,
            "lr": lr,
            # 1 / exp(scale) without dividing: a diverged scale underflows exp() to 0 (inf is logged, not
            # raised)
            "temperature": float((-logit_scale.detach().float().clamp(max=math.log(100))).exp().item()),
            "negatives": negatives,
            "samples_per_s": window["samples"] / elapsed if elapsed > 0 else 0.0,
            "data_wait_fraction": window["wait"] / elapsed if elapsed > 0 else 0.0,
            "bad_samples": self.state.bad_samples,
            "skipped_steps": self.state.skipped_steps,
            **self.weighter.metrics(),
        }
        self.metrics.log(self.state.step, record, histograms=self.weighter.histograms())

    def evaluate(self) -> dict[str, float]:
        """Periodic zero-shot evaluation on the main process (others wait); logged to metrics.jsonl as
        {"step", "eval/TASK/METRIC": value} and to TensorBoard."""
        acc = self.accelerator
        results: dict[str, float] = {}
        if acc.is_main_process:
            from mmcl.eval.periodic import evaluate_during_training

            results = evaluate_during_training(
                acc.unwrap_model(self.model), self.cfg.eval, read_options(self.cfg.data)
            )
            self.metrics.log(self.state.step, {f"eval/{k}": v for k, v in results.items()})
            acc.print(
                "eval step {}: {}".format(
                    self.state.step, ", ".join(f"{k} {v:.3f}" for k, v in results.items())
                )
            )
        acc.wait_for_everyone()
        return results

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Gather per-rank RNG and data positions, then the main process writes one atomic checkpoint."""
        acc = self.accelerator
        mine = {
            "rng": rng_state(),
            "data": self.data_state.state_dict(),
            "consumed": self.data_state.take_consumed().state_dict(),
        }
        per_rank = gather_object([mine])
        full_state = acc.get_state_dict(self.model)  # collective under FSDP/DeepSpeed: every rank calls it
        path = None
        if acc.is_main_process:
            self.progress.record(
                self.state.step,
                [entry["data"] for entry in per_rank],
                [SampleLedger.from_state_dict(entry["consumed"]) for entry in per_rank],
            )
            self.progress.global_batch = (
                self.cfg.data.batch_size * self.cfg.train.accumulation_steps * acc.num_processes
            )
            self.state.data = self.progress.state_dict()
            extra, extra_tensors = self.weighter.state_dict()
            path = save_checkpoint(
                self.output / CHECKPOINTS,
                model_state=acc.unwrap_model(self.model).export_state_dict(full_state),
                model_config=self.cfg.model.model_dump(mode="json", exclude_defaults=True),
                optimizer_state=self.optimizer.state_dict(),
                train_state=self.state,
                rng=[entry["rng"] for entry in per_rank],
                extra=extra,
                extra_tensors=extra_tensors,
                keep_last=self.cfg.train.keep_last,
                model_files=acc.unwrap_model(self.model).save_model_files,
            )
        acc.wait_for_everyone()
        return path

    def cleanup(self) -> None:
        if self.accelerator.is_main_process:
            self.weighter.plot(self.output / NOISE_PLOT, self.state.step)
        if self.metrics is not None:
            self.metrics.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self.accelerator.end_training()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}


NOISE_PLOT = "noise_weights.png"
RUN_OUTPUTS = (METRICS, CHECKPOINTS, TENSORBOARD, NOISE_PLOT, SAMPLE_KEYS)


def _set_aside_earlier_run(output: Path, say) -> None:
    """train.resume=never in a folder that holds an earlier run: move that run's outputs into
    `previous-<time>/`, so its metrics are not mixed into this run's and a later `resume: auto` cannot pick
    up its checkpoints; nothing is deleted."""
    found = [output / name for name in RUN_OUTPUTS if (output / name).exists()]
    if not found:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = output / f"previous-{stamp}", 1
    while target.exists():
        target, n = output / f"previous-{stamp}-{n}", n + 1
    target.mkdir()
    for path in found:
        os.replace(path, target / path.name)
    say(f"train.resume=never: moved the earlier run's {', '.join(p.name for p in found)} to {target}")


def run_training(config: TrainConfig) -> TrainState:
    """setup -> train -> cleanup; what `mmcl train` calls."""
    trainer = Trainer(config)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
