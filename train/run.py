"""What every training run shares: the accelerator, the output folder, checkpoints and resume, RNG states, stopping on
SIGTERM/SIGINT, collectives with a clear failure, the optimiser step summed over processes, and the Hub upload.

:class:`TrainingRun` is a base class: a trainer sets the attributes it documents and writes its own ``state_dict`` /
``load_state_dict``; ``train.parrot.Trainer`` and ``train.rpo.RPOTrainer`` are the two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import signal
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object

from parrot_pipeline import ParrotPipeline, push_bundle_to_hub
from parrot_pipeline.tiny import default_tiny_model

from .checkpoint import latest_checkpoint, remove_partial_checkpoints, write_checkpoint
from .config import resume_differences
from .outputs import MetricsWriter

logger = logging.getLogger(__name__)


def create_accelerator(config, output_dir: Path) -> Accelerator:
    """The run's accelerator (TensorBoard logs in ``output_dir/logs``); asking for CUDA where there is none fails."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config `device` = 'cuda' but no CUDA device is available; use device: cpu or auto.")
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    return Accelerator(
        cpu=config.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout))],
    )


class TrainingRun:
    """Run control shared by the trainers. A subclass sets ``config`` (with ``pretrained_model``,
    ``mixed_precision``, ``resume``, ``overwrite``, ``keep_checkpoints``, ``collective_timeout``, ``max_grad_norm``,
    ``push_to_hub`` and ``hub_private``), ``output_dir``, ``checkpoints_dir``, ``accelerator``, ``num_processes``,
    ``rank``, ``device``, ``rng`` (a ``random.Random``), ``generator`` (a ``torch.Generator``), ``optimizers`` and
    ``lr_schedulers`` (dicts by name), ``iteration``, ``history`` (the metrics records), ``run_id``, ``stop_signal``
    and ``checkpointed_at``; it writes ``state_dict`` / ``load_state_dict`` and lists in ``resume_fixed`` the
    settings a resumed run must share with its checkpoint."""

    resume_fixed: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------------------------
    # Output folder, checkpoints and resume

    def _checkpoint_to_resume(self) -> tuple[Path, dict] | None:
        """With ``resume``, the newest complete checkpoint of this output_dir's run, checked against the config."""
        if not self.config.resume:
            return None
        found = latest_checkpoint(self.checkpoints_dir)
        if found is None:
            logger.warning("resume=true but %s holds no complete checkpoint: starting from scratch.", self.checkpoints_dir)
            return None
        folder, state = found
        run_file = self.output_dir / "run.json"
        run_id = json.loads(run_file.read_text(encoding="utf-8"))["run_id"] if run_file.is_file() else None
        if state["run_id"] != run_id:
            raise ValueError(
                f"Checkpoint {folder} was written by another run (run id {state['run_id']}) than the one in "
                f"`output_dir` {str(self.output_dir)!r} (run id {run_id}); resume it from its own output_dir, or "
                "remove it."
            )
        differences = resume_differences(state["config"], self.config, self.resume_fixed)
        if differences:
            raise ValueError(
                f"Cannot resume from {folder}: these settings differ from the checkpoint's and a resumed run cannot "
                "honour them:\n  " + "\n  ".join(differences) + "\nRestore them, or start a new run in another output_dir."
            )
        return folder, state

    def _check_output_dir(self, checkpoint) -> None:
        """A new run needs an empty (or absent) output_dir, unless ``overwrite``."""
        if checkpoint is None and self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.config.overwrite:
            raise FileExistsError(
                f"`output_dir` {str(self.output_dir)!r} already exists and is not empty"
                + (" and holds no checkpoint to resume" if self.config.resume else "")
                + "; pass overwrite=true to replace it, resume=true to continue its run, or choose another output_dir."
            )

    def _prepare_output_dir(self, resuming: bool) -> None:
        """The main process's first write: a fresh output_dir with the run id, or a resumed one tidied up."""
        if resuming:
            remove_partial_checkpoints(self.checkpoints_dir)
            return
        if self.config.overwrite and self.output_dir.exists():
            shutil.rmtree(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "run.json").write_text(json.dumps({"run_id": self.run_id}) + "\n", encoding="utf-8")

    def _begin(self, checkpoint: tuple[Path, dict] | None, project: str) -> None:
        """Called once every input is checked and every model loaded: only now does the run touch output_dir (the main
        process, once every process has made its checks); a resumed run loads its checkpoint; logging starts."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._prepare_output_dir(resuming=checkpoint is not None)
        self.accelerator.wait_for_everyone()
        if checkpoint is not None:
            self.load_state_dict(checkpoint[1])
            logger.warning("Resuming from %s at iteration %d.", checkpoint[0], self.iteration)
            self.checkpointed_at = self.iteration
        self.accelerator.init_trackers(project, config={k: str(v) for k, v in self.config.to_dict().items()})
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl")
        if self.accelerator.is_main_process and checkpoint is not None:
            self.metrics.rewrite(self.history)  # iterations after the checkpoint are run again

    def _load_base_pipeline(self) -> None:
        """The base model (``pretrained_model``; "tiny": the embedded one) on the run's device, in the mixed-precision
        dtype, every weight frozen, without an expander: sets ``pipe``, ``base_model`` and ``weight_dtype``."""
        config = self.config
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.base_model = str(default_tiny_model()) if config.pretrained_model == "tiny" else config.pretrained_model
        self.pipe = ParrotPipeline.from_pretrained(
            self.base_model, torch_dtype=self.weight_dtype, expander=None, expander_tokenizer=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)

    def random_states(self) -> dict:
        return {
            "trainer": self.rng.getstate(),
            "sampler": self.generator.get_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def set_random_states(self, states: dict) -> None:
        self.rng.setstate(states["trainer"])
        self.generator.set_state(states["sampler"])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if states["cuda"]:
            torch.cuda.set_rng_state_all(states["cuda"])

    def run_state(self) -> dict:
        """What every run's checkpoint holds; a trainer's ``state_dict`` adds its weights and statistics. Called on
        every process (it gathers their RNG states)."""
        scaler = self.accelerator.scaler
        return {
            "run_id": self.run_id,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "lr_schedulers": {name: scheduler.state_dict() for name, scheduler in self.lr_schedulers.items()},
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "history": self.history,
            "random_states": self._collective("gathering RNG states", gather_object, [self.random_states()]),
        }

    def load_run_state(self, state: dict) -> None:
        """The inverse of :meth:`run_state`."""
        self.run_id = state["run_id"]
        self.iteration = state["iteration"]
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            self.lr_schedulers[name].load_state_dict(state["lr_schedulers"][name])
        if state["grad_scaler"] is not None and self.accelerator.scaler is not None:  # fp16 on CUDA then and now
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.history = state["history"]
        saved_states = state["random_states"]
        if len(saved_states) == self.num_processes:
            self.set_random_states(saved_states[self.rank])
        else:  # another process count: each process keeps its own sampler
            logger.warning(
                "The checkpoint was written by %d processes and this run has %d: weights, optimisers and statistics "
                "continue, but the samples will not repeat an uninterrupted run.", len(saved_states), self.num_processes,
            )  # fmt: skip
            self.set_random_states({**saved_states[0], "sampler": self.generator.get_state()})

    def save_checkpoint(self) -> None:
        """``checkpoints/step_N`` of the current iteration (the main process writes; every process takes part)."""
        state = self.state_dict()
        if self.accelerator.is_main_process:
            folder = write_checkpoint(self.checkpoints_dir, self.iteration, state, keep=self.config.keep_checkpoints)
            logger.info("checkpoint %s", folder)
        self.checkpointed_at = self.iteration
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------------------
    # Stopping, collectives, optimiser steps

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGTERM/SIGINT ask the loop to stop after the current iteration with a checkpoint; a second one stops now."""

        def request_stop(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            logger.warning("%s: stopping after this iteration with a checkpoint.", signal.Signals(signum).name)

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop (they all stop at the same iteration)."""
        if self.num_processes == 1:
            return self.stop_signal is not None
        signals = torch.tensor([self.stop_signal or 0], device=self.device)
        signals = self._collective("agreeing on a stop", self.accelerator.reduce, signals, "max")
        self.stop_signal = int(signals.item()) or None
        return self.stop_signal is not None

    def _stop_with_checkpoint(self, progress) -> None:
        """After a stop request: checkpoint (unless this iteration has one), then exit with 128 + the signal."""
        if self.checkpointed_at != self.iteration:
            self.save_checkpoint()
        self.accelerator.end_training()
        progress.close()
        print(f"stopped by {signal.Signals(self.stop_signal).name} at iteration {self.iteration}; "
              f"continue with resume=true (checkpoints in {self.checkpoints_dir})")  # fmt: skip
        raise SystemExit(128 + self.stop_signal)

    def _collective(self, what: str, function, *args):
        """Run a collective; a dead or stalled peer becomes an error that says what happened and how to go on."""
        if self.num_processes == 1:
            return function(*args)
        try:
            return function(*args)
        except RuntimeError as error:  # gloo and NCCL report a closed peer or a timeout as RuntimeError subclasses
            raise RuntimeError(
                f"Process {self.rank} of {self.num_processes}: {what} failed: another training process stopped or "
                f"did not answer within collective_timeout = {self.config.collective_timeout:g} s ({error}). "
                f"Restart with resume=true to continue from the newest checkpoint in {self.checkpoints_dir}."
            ) from error

    def _optimizer_step(self, name: str) -> bool:
        """Sum the gradients over processes, then step; a non-finite gradient skips the step (on every process
        alike, since they all see the same sum). Returns whether it stepped."""
        optimizer = self.optimizers[name]
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if self.num_processes > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
            flat = self._collective("summing gradients", self.accelerator.reduce, flat, "sum")
            for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
                parameter.grad = grad.view_as(parameter)
        scaler = self.accelerator.scaler  # fp16 on CUDA: accelerator.backward scaled the loss
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads and not torch.stack([torch.isfinite(grad).all() for grad in grads]).all():
            logger.warning("iteration %d: non-finite %s gradient; the update is skipped", self.iteration, name)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # a smaller loss scale next time
            return False
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def step_lr_schedulers(self) -> None:
        """The learning-rate schedules advance once per iteration, however many optimiser steps it took."""
        for scheduler in self.lr_schedulers.values():
            scheduler.step()

    # ------------------------------------------------------------------------------------------------------------
    # The Hub

    def push(self, folder: Path, upload=push_bundle_to_hub) -> dict:
        """Upload the bundle (or, with ``upload=upload_folder_to_hub``, any model folder); a failure after the retries
        is reported with the folder's local path, not raised."""
        try:
            url = upload(folder, self.config.push_to_hub, private=self.config.hub_private)
        except Exception as error:  # noqa: BLE001  (any failure: the run's results must survive it)
            logger.error(
                "Upload of %s to the Hub repo %r failed (%s: %s). The bundle is safe at %s; upload it later with "
                "`hf upload %s %s`.", folder, self.config.push_to_hub, type(error).__name__, error, folder,
                self.config.push_to_hub, folder,
            )  # fmt: skip
            return {"repo_id": self.config.push_to_hub, "error": f"{type(error).__name__}: {error}"}
        print(f"pushed to {url}")
        return {"repo_id": self.config.push_to_hub, "url": url}
