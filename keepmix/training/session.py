"""Everything around the training loop: run directory, devices, model, logging, evals, checkpoints.

Contract: `open_session` prepares a run (or the resume of one) and yields a `Session` whose methods the
loop calls at named points — `begin`, `log_train`, `log_eval`, `add_exposures`, `save_checkpoint`,
`finish`. Only the main process writes files, and nothing in the run directory is written before `begin`:
the session first decides what to do with the folder and reads everything it needs (the task files, and
for a resume the newest checkpoint that verifies against its manifest and loads whole, passing over
damaged ones), and `begin` restores that state into the built components before it writes the config,
cuts metrics.jsonl back to the checkpoint and logs the `start` record. So a start or resume that fails —
bad data, a bad task file, a damaged or mismatched checkpoint, a changed config — changes nothing.
Starting a new run in a directory that already holds one is refused; a folder whose run stopped before
its first optimizer step (no training record, no checkpoint) is started over; `resume=True` where there
is no run starts one; `resume=True` on a run without an intact checkpoint is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from keepmix.config import RunConfig, changed_keys, config_to_dict, dump_config
from keepmix.errors import KeepmixError
from keepmix.model import load_configured, load_trainable_state, save_final, trainable_state
from keepmix.training.cpu_memory import heap_guard_for_run, keep_freed_memory_for_run
from keepmix.training.precision import mixed_precision, slow_bf16_notice
from keepmix.training import checkpoint as ckpt


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    micro_step: int = 0  # forward/backward passes done (this process)
    tokens_seen: int = 0  # real (non-padding) tokens trained on, all processes
    elapsed: float = 0.0  # training wall time before this session
    resumed_from: int | None = None
    baseline: dict[str, float] = field(default_factory=dict)


def _lr_scheduler(optimizer, t):
    from transformers import get_scheduler

    warmup = int(t.warmup) if t.warmup >= 1 else int(round(t.warmup * t.steps))
    if t.lr_schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    if t.lr_schedule == "linear":
        return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=t.steps)
    if t.lr_schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=t.steps,
                             scheduler_specific_kwargs={"min_lr_rate": t.min_lr_ratio})
    decay = int(round(t.decay * t.steps))
    return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup, num_training_steps=t.steps,
                         scheduler_specific_kwargs={"num_decay_steps": decay, "min_lr_ratio": t.min_lr_ratio})


def make_accelerator(device: str, precision: str):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KeepmixError("train.device is 'cuda' but no CUDA device is available")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise KeepmixError("keepmix shards the model itself: set train.fsdp: true in the config and launch "
                           "without accelerate's FSDP options (--use_fsdp / an FSDP accelerate config)")
    mixed = mixed_precision(precision, cuda)
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process; a process that runs several runs (a sweep's arms, the
    # demo, a test worker) may ask for another one: start its state over, leaving the process group be
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


class Session:
    def __init__(self, cfg: RunConfig, resume: bool, progress):
        self.cfg = cfg
        self.run_dir = Path(cfg.resolve_local(cfg.output))
        self.progress = progress
        self.state = TrainState()
        self.accelerator = make_accelerator(cfg.train.device, cfg.train.precision)
        self.main = self.accelerator.is_main_process
        # with one process there is nothing to shard: the run is the plain one
        self.fsdp = cfg.train.fsdp and self.accelerator.num_processes > 1
        self._root = None  # the sharded LossModel (FSDP)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ckpt_root = self.run_dir / "checkpoints"
        self.last_metrics: dict[str, float] = {}
        self.last_retention: dict[str, dict] = {}
        self.reused_baseline = self._read_baseline()  # checked before anything is written
        from keepmix.eval.tasks import check_tasks

        check_tasks(list(cfg.eval.tasks), Path(cfg.base_dir), cfg.sources)  # a bad task file fails now, not at the first eval
        self._committed = False  # nothing in the run directory changes before `begin`
        self._found = self._plan_run_dir(resume)
        self._latest = self._found.path if self._found else None
        self.resumed_from = int(self._latest.name.split("-")[1]) if self._latest else None
        self._warm = self._read_warm_start() if self._found is None else None  # a resume ignores init_from
        self._warm_record: dict | None = None  # what the warm start took, for the start record
        self.state.resumed_from = self.resumed_from
        self._trackers = None
        self._heap_guard = None
        self._clock = time.perf_counter()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        keep_freed_memory_for_run(cfg, self.accelerator.device)
        if notice := slow_bf16_notice(cfg.train.precision, self.accelerator.device.type == "cuda"):
            self.progress.notice(notice)
        m = cfg.model
        self.model, self.tokenizer = load_configured(self.cfg)
        if m.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.model.train()
        self._tasks = list(cfg.eval.tasks)

    def generated_sources(self) -> dict[str, str]:
        """The files of the self-rehearsal sources, written by the base model (the main process) before
        the first update; read back from the cache when the same model and settings wrote them before."""
        if not any(src.generate for src in self.cfg.sources):
            return {}
        from keepmix.data.build import cache_root
        from keepmix.data.rehearsal import generate_sources

        device = self.accelerator.device
        self.model.to(device)
        paths = generate_sources(self.cfg, self.model, self.tokenizer, cache_dir=cache_root(self.cfg),
                                 device=device, log=self.progress.message, write=self.main)
        self.accelerator.wait_for_everyone()
        return paths

    def frozen_base(self):
        """The starting model's distribution when a KL term or the kl_to_base metric needs it, else None.
        Made before any update and before a resume's checkpoint is loaded, so it is always the base."""
        from keepmix.data.build import cache_root
        from keepmix.training.forward import FrozenBase

        training = any(src.kl_to_base > 0 for src in self.cfg.sources)
        if not training and not self.cfg.eval.kl_to_base:
            return None
        # under FSDP (evals only: a KL term in the loss is refused by the config) a full-model base is one
        # whole, unsharded copy per process; a LoRA base is the sharded model itself, its adapter off.
        # Its held-out hidden states are kept on disk for the other runs of the same base (not when
        # sharded: each process then holds a different part of the weights)
        store = None if self.fsdp else cache_root(self.cfg) / "base_hidden"
        return FrozenBase(self.model, store=store).to(self.accelerator.device)

    @property
    def starts_from_base(self) -> bool:
        """Whether the weights at step 0 are the base's (`frozen_base`): no resume, no warm start, not sharded."""
        return self._found is None and self._warm_record is None and not self.fsdp

    # ---- distribution ---------------------------------------------------------------------------
    def wrap(self, loss_model):
        """The LossModel ready to train: DDP through accelerate, or sharded (FSDP); compiled on request.
        Build the optimizer from the returned module's parameters (sharding replaces them)."""
        acc = self.accelerator
        if self.fsdp:
            from keepmix.training import sharding

            self._root = sharding.shard(loss_model.to(acc.device), self.model, bf16=acc.mixed_precision == "bf16")
            return torch.compile(self._root) if self.cfg.train.compile else self._root
        if self.cfg.train.compile:
            from keepmix.data.build import cache_root
            from keepmix.training.compiled import compile_for_training

            how = "blocks" if self.cfg.train.compile is True else self.cfg.train.compile
            loss_model = compile_for_training(loss_model, self.model, how, cache_root(self.cfg),
                                              log=self.progress.message)
        return acc.prepare(loss_model)

    def no_sync(self, loss_model, sync: bool):
        """Skip the gradient reduction of a micro-batch unless `sync` (the last of a step)."""
        if sync:
            return contextlib.nullcontext()
        if self.fsdp:
            from keepmix.training.sharding import no_gradient_sync

            return no_gradient_sync(self._root)
        return self.accelerator.no_sync(loss_model)

    def clip_gradients(self, params: list) -> torch.Tensor:
        """Clip to train.grad_clip (if set); the global gradient norm before clipping, as a plain tensor."""
        from keepmix.training.sharding import total_norm

        clip = self.cfg.train.grad_clip
        grads = [p.grad for p in params if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None
                else torch.nn.utils.get_total_norm(grads))
        return total_norm(norm)

    # ---- run directory --------------------------------------------------------------------------
    def _run_kind(self) -> str:
        """'empty' (nothing here), 'unstarted' (a run that stopped before its first optimizer step and
        left no checkpoint: nothing to keep) or 'run'."""
        has_ckpt_dir = self.ckpt_root.is_dir() and any(self.ckpt_root.iterdir())
        if not self.metrics_path.exists():
            return "run" if has_ckpt_dir else "empty"
        from keepmix.report.metrics import of_kind, read_metrics

        trained = of_kind(read_metrics(self.metrics_path), "train")
        return "run" if trained or has_ckpt_dir else "unstarted"

    def _plan_run_dir(self, resume: bool) -> ckpt.Found | None:
        """Decide, without writing anything, what this session does with the run directory: start a new
        run (None) or resume from the newest intact checkpoint (read whole into memory here)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise KeepmixError(f"output: {self.run_dir} is a file; expected a run directory (or none yet)")
        kind = self._run_kind()
        if kind == "unstarted":
            self.progress.notice(f"{self.run_dir} holds a run that stopped before its first training step "
                                 f"(no checkpoint): starting it over")
            return None
        if kind == "empty":
            if resume:
                self.progress.notice(f"--resume: no run in {self.run_dir} yet; starting a new one")
            return None
        if not resume:
            raise KeepmixError(
                f"{self.run_dir} already holds a run; continue it with --resume, or set another output "
                f"(nothing was changed)"
            )
        found = ckpt.intact_checkpoint(self.ckpt_root)
        damaged = "; ".join(f"{p.name}: {why}" for p, why in found.damaged)
        if found.path is None:
            where = ("checkpoints/ is missing" if not self.ckpt_root.is_dir()
                     else f"no intact checkpoint in {self.ckpt_root}" + (f" ({damaged})" if damaged else ""))
            raise KeepmixError(f"cannot resume {self.run_dir}: it holds a run but {where}; nothing was changed. "
                               f"Start a new run in another output folder (or delete this one to start over).")
        for path, why in found.damaged:
            self.progress.notice(f"checkpoint {path.name} is damaged ({why}): resuming from {found.path.name}")
        changed = changed_keys(found.loaded["config"] or {}, config_to_dict(self.cfg))
        if changed:
            raise KeepmixError(
                f"cannot resume {found.path}: the config changed in keys that break an exact resume: "
                f"{', '.join(changed)}. Restore them, or start a new run in another output folder."
            )
        saved_world = found.loaded["state"].get("world_size", 1)
        if saved_world != self.accelerator.num_processes:
            raise KeepmixError(
                f"cannot resume {found.path}: it was written by {saved_world} process(es), this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes"
            )
        return found

    def begin(self, sampler, optimizer, scheduler) -> None:
        """Restore the checkpoint (when resuming) into the built components, then — only then — write:
        the resolved config, metrics.jsonl cut back to the checkpoint, and the `start` record. Whatever
        fails before this point leaves the run directory as it was."""
        if self._found is not None:
            self._restore(sampler, optimizer, scheduler)
        elif self._warm is not None:
            self._warm_start(sampler, optimizer)
        self.accelerator.wait_for_everyone()  # every process has checked and restored before any write
        self._committed = True
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            self._truncate_metrics(self._latest)
            self._log_start()
        self._heap_guard = heap_guard_for_run()  # after loading and restoring: trims what they left behind

    def after_step_memory(self) -> None:
        """Once per step, after its evals and checkpoints: bound what kept freed memory holds resident."""
        if self._heap_guard is not None:
            self._heap_guard.after_step()

    def _truncate_metrics(self, latest: Path | None) -> None:
        """Keep the records up to the checkpoint a resume starts from (all of them: none)."""
        if not self.metrics_path.exists():
            return
        keep_step = int(latest.name.split("-")[1]) if latest else -1
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if rec.get("kind") == "start" and latest is not None:
                kept.append(line)
            elif rec.get("kind") in ("train", "epoch", "eval") and rec.get("step", 0) <= keep_step:
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    # ---- logging --------------------------------------------------------------------------------
    def now(self) -> float:
        return self.state.elapsed + time.perf_counter() - self._clock

    def log(self, record: dict) -> None:
        if not self.main or not self._committed:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._trackers is not None:
            self._trackers.log(record)

    def _log_start(self) -> None:
        if self.cfg.trackers:
            from keepmix.report.metrics import make_trackers

            self._trackers = make_trackers(list(self.cfg.trackers), self.run_dir, config_to_dict(self.cfg))
        self.log({
            "kind": "start", "time": time.time(), "total_steps": self.cfg.train.steps,
            "seq_len": self.cfg.train.seq_len, "batch_size": self.cfg.train.batch_size,
            "sources": self.cfg.source_names, "model": self.cfg.model.name or "scratch",
            "resumed_from": int(self._latest.name.split("-")[1]) if self._latest else None,
            "output": str(self.run_dir), "world_size": self.accelerator.num_processes,
            "precision": "bf16" if self.accelerator.mixed_precision == "bf16" else "fp32",
            **({"damaged_checkpoints": {p.name: why for p, why in self._found.damaged}}
               if self._found and self._found.damaged else {}),
            **({"init_from": self._warm_record} if self._warm_record else {}),
        })

    def log_train(self, totals: dict, names: list[str], weights: np.ndarray, lr: float, grad_norm: float,
                  tokens: int, seconds: float, sampler, probe_s: float | None = None,
                  betas: torch.Tensor | None = None, l2: float | None = None) -> None:
        st = self.state
        n_tokens = float(totals["tokens"].sum())
        rows = totals["rows"]
        cum = sampler.assigned / max(sampler.assigned.sum(), 1)
        record = {
            "kind": "train", "step": st.step, "micro_step": st.micro_step, "tokens_seen": st.tokens_seen,
            "time": round(self.now(), 3), "lr": lr,
            "loss": float(totals["loss"].sum()) / max(n_tokens, 1.0),
            "token_acc": float(totals["correct"].sum()) / max(n_tokens, 1.0),
            "grad_norm": grad_norm, "tokens_per_s": tokens / max(seconds, 1e-9),
            "packing": tokens / (self.cfg.train.batch_size * self.cfg.train.seq_len),
            "sources": {
                name: {"loss": float(totals["loss"][i]) / max(float(totals["tokens"][i]), 1.0),
                       "token_acc": float(totals["correct"][i]) / max(float(totals["tokens"][i]), 1.0),
                       "tokens": int(totals["tokens"][i]), "rows": int(rows[i])}
                for i, name in enumerate(names) if rows[i] > 0
            },
            "planned": {name: float(weights[i]) for i, name in enumerate(names)},
            "realized": {name: float(rows[i] / rows.sum()) for i, name in enumerate(names)},
            "realized_cum": {name: float(cum[i]) for i, name in enumerate(names)},
            "epoch": {name: round(sampler.streams[i].passes_done, 4) for i, name in enumerate(names)},
        }
        if sampler.guard is not None:  # planned = the schedule's shares, guarded = the ones drawn from
            g = sampler.guard
            record["planned"] = {name: float(g.last_planned[i]) for i, name in enumerate(names)}
            record["guarded"] = {name: float(weights[i]) for i, name in enumerate(names)}
            record["guard"] = {**g.record(), "probe_s": probe_s}
        if betas is not None or l2 is not None:
            # the objective's terms, in the loss's unit (per target token), so that they add up
            kl_term = float((betas.double() * totals["kl"]).sum()) / max(n_tokens, 1.0) if betas is not None else 0.0
            record.update(kl_term=kl_term, l2_term=l2 or 0.0, objective=record["loss"] + kl_term + (l2 or 0.0))
            for i, name in enumerate(names):
                if name in record["sources"] and totals["kl_tokens"][i] > 0:
                    record["sources"][name]["kl"] = float(totals["kl"][i] / totals["kl_tokens"][i])
        self.log(record)
        if self.main and (st.step % self.cfg.train.log_every == 0 or st.step == self.cfg.train.steps):
            self.progress.train(record)

    def add_exposures(self, writer, segments: list, stats, names: list[str], lr: float) -> None:
        """One row per (document segment, training row) of this step, in global row order."""
        loss = torch.cat(stats.segment_loss).tolist() if segments else []
        tokens = torch.cat(stats.segment_tokens).tolist() if segments else []
        local = [(row, src, seg.doc_id, seg.view, l, int(n))
                 for (row, src, seg), l, n in zip(segments, loss, tokens)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        if writer is None or not local:
            return
        local.sort(key=lambda x: x[0])  # stable: segments keep their order within a row
        _, src, doc, view, loss_sum, n = map(list, zip(*local))
        n = np.asarray(n, dtype=np.int32)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.asarray(loss_sum) / np.maximum(n, 1), np.nan)
        writer.add(self.state.step, [names[i] for i in src], doc, view, lr, mean, n)

    def run_tasks(self) -> dict[str, float]:
        """Task metrics, computed by the main process and shared with the others."""
        if not self._tasks:
            return {}
        from keepmix.eval.tasks import run_task

        out = {}
        # A sharded model needs every process in each forward, so under FSDP all of them run the tasks
        # (same items, same results); otherwise the main process runs them and shares the numbers.
        if self.main or self.fsdp:
            from keepmix.training.sharding import gathered_root

            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            with gathered_root(self._root) if self.fsdp else contextlib.nullcontext():
                for task in self._tasks:
                    for key, value in run_task(task, model, self.tokenizer, base_dir=Path(self.cfg.base_dir),
                                               device=self.accelerator.device,
                                               batch_size=self.cfg.eval.batch_size,
                                               sources=self.cfg.sources).items():
                        out[f"task/{task.name}/{key}"] = value
            if was_training:
                model.train()
        if self.accelerator.num_processes > 1 and not self.fsdp:
            from accelerate.utils import broadcast_object_list

            out = broadcast_object_list([out])[0]
        return out

    def _read_baseline(self) -> dict[str, float] | None:
        """The step-0 metrics of eval.baseline_from — the same untouched model on the same held-out data
        and tasks, so evaluating it again would give the same numbers — or None when not set."""
        if not self.cfg.eval.baseline_from:
            return None
        from keepmix.config import baseline_changes

        other = Path(self.cfg.resolve_local(self.cfg.eval.baseline_from))
        try:
            saved = yaml.safe_load((other / "config.yaml").read_text())
        except (OSError, yaml.YAMLError) as err:
            raise KeepmixError(f"eval.baseline_from: cannot read {other / 'config.yaml'} ({err})") from None
        changed = baseline_changes(saved, config_to_dict(self.cfg))
        if changed:
            raise KeepmixError(f"eval.baseline_from: {other} evaluated another model or other data: "
                               f"{', '.join(changed)} differ; its baseline would not be this run's")
        from keepmix.report.metrics import of_kind, read_metrics

        for record in of_kind(read_metrics(other / "metrics.jsonl"), "eval"):
            if record.get("step") == 0:
                return record["metrics"]
        raise KeepmixError(f"eval.baseline_from: {other}/metrics.jsonl has no step-0 eval record")

    def log_eval(self, metrics: dict[str, float]) -> None:
        from keepmix.eval.retention import compute_retention

        st = self.state
        if st.step == 0:
            st.baseline = dict(metrics)
        from keepmix.eval.tasks import task_directions, task_tolerances

        retention = compute_retention(st.baseline, metrics, self.cfg.eval.retention_tolerance,
                                      task_tolerances(self._tasks),
                                      task_directions(self._tasks, Path(self.cfg.base_dir)))
        self.last_metrics, self.last_retention = metrics, retention
        record = {"kind": "eval", "step": st.step, "tokens_seen": st.tokens_seen, "time": round(self.now(), 3),
                  "metrics": metrics, "retention": retention}
        if st.step == 0 and self.cfg.eval.baseline_from:
            record["baseline_from"] = self.cfg.resolve_local(self.cfg.eval.baseline_from)
        self.log(record)
        if self.main:
            self.progress.eval(record)
            (self.run_dir / "retention.json").write_text(json.dumps(
                {"step": st.step, "baseline_step": 0, "retention": retention}, indent=1))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, sampler, optimizer, scheduler) -> None:
        acc, st = self.accelerator, self.state
        staging = None
        if self.fsdp:  # every process writes its shards into the staging folder first
            from keepmix.training.sharding import save_sharded

            if self.main:
                ckpt.staging_dir(self.ckpt_root, st.step)
            acc.wait_for_everyone()
            staging = ckpt.staging_path(self.ckpt_root, st.step)
            save_sharded(staging / ckpt.SHARDED, self._root, optimizer)
            acc.wait_for_everyone()
        if self.main:
            state = {"step": st.step, "micro_step": st.micro_step, "tokens_seen": st.tokens_seen,
                     "elapsed": self.now(), "baseline": st.baseline, "sampler": sampler.state_dict(),
                     "world_size": acc.num_processes}
            weights = None if self.fsdp else trainable_state(acc.unwrap_model(self.model))
            path = ckpt.save_checkpoint(self.ckpt_root, st.step, weights=weights,
                                        optimizer=None if self.fsdp else optimizer.state_dict(),
                                        scheduler=scheduler.state_dict(), state=state,
                                        keep=self.cfg.train.keep_checkpoints, staging=staging,
                                        extra_files={"config.yaml": (self.run_dir / "config.yaml").read_text()})
            self.progress.message(f"checkpoint: {path}")
        acc.wait_for_everyone()

    def _restore(self, sampler, optimizer, scheduler) -> None:
        """Load the verified checkpoint (already in memory) into the model and every stateful component."""
        loaded = self._found.loaded
        if (loaded["sharded"] is not None) != self.fsdp:
            raise KeepmixError(f"cannot resume {self._latest}: it was written "
                               f"{'with' if loaded['sharded'] is not None else 'without'} FSDP sharding and "
                               f"this run is {'sharded' if self.fsdp else 'not sharded'}")
        if self.fsdp:
            from keepmix.training.sharding import load_sharded

            load_sharded(loaded["sharded"], self._root, optimizer)
        else:
            load_trainable_state(self.accelerator.unwrap_model(self.model), loaded["weights"])
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        ckpt.set_rng_state(loaded["rng"])
        s = loaded["state"]
        sampler.load_state_dict(s["sampler"])
        st = self.state
        st.step, st.micro_step, st.tokens_seen = s["step"], s["micro_step"], s["tokens_seen"]
        st.elapsed, st.baseline = s["elapsed"], s["baseline"]
        self._found.loaded = None  # the weights now live in the model: free the copy
        self._clock = time.perf_counter()
        self.progress.message(f"resumed from {self._latest} (step {st.step})")

    def _read_warm_start(self) -> dict | None:
        """train.init_from's checkpoint, verified and read whole before anything is written."""
        init = self.cfg.train.init_from
        if init is None:
            return None
        path = ckpt.step_dir(Path(self.cfg.resolve_local(init.run)) / "checkpoints", init.step)
        loaded = ckpt.read_checkpoint(path)
        if loaded["sharded"] is not None or self.fsdp:
            raise KeepmixError(f"train.init_from: {path} is sharded or this run is (FSDP); a warm start needs "
                               f"unsharded weights on both sides")
        if init.optimizer and loaded["optimizer"] is None:
            raise KeepmixError(f"train.init_from.optimizer: {path} holds no optimizer state")
        return {"path": path, **loaded}

    def _warm_start(self, sampler, optimizer) -> None:
        """Weights (and, on request, AdamW moments) from another run's checkpoint; this run's LR schedule and
        step counter start fresh. Each source's document stream continues where that run stopped when
        both runs read the same data with the same split and seed, so the arm does not see the prefix's
        documents again first."""
        warm, init = self._warm, self.cfg.train.init_from
        load_trainable_state(self.accelerator.unwrap_model(self.model), warm["weights"])
        if init.optimizer:
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(warm["optimizer"])
            for group, hyper in zip(optimizer.param_groups, fresh):
                group.update(hyper)  # this run's lr, betas, eps and weight decay, not the prefix's
        from keepmix.config import baseline_changes

        # the same sources, split and seed (what the baseline check compares): the streams are the same
        continued = warm["config"] is not None and not baseline_changes(warm["config"], config_to_dict(self.cfg))
        if continued:
            for stream, state in zip(sampler.streams, warm["state"]["sampler"]["streams"]):
                stream.load_state_dict(state)
        self._warm_record = {"run": str(warm["path"].parent.parent), "step": init.step,
                             "checkpoint": str(warm["path"]), "optimizer": init.optimizer,
                             "data": "continued" if continued else "fresh"}
        self._warm = None  # the weights now live in the model
        self.progress.message(f"warm start from {warm['path']} (weights{' and optimizer' if init.optimizer else ''})")

    def save_final(self) -> Path | None:
        """final/ in Hugging Face format, written by the main process (under FSDP every process first
        sends its shards, and the main process loads them into a whole copy of the model)."""
        out = self.run_dir / "final"
        merge = bool(self.cfg.model.lora and self.cfg.model.lora.merge)
        model = self.accelerator.unwrap_model(self.model)
        if self.fsdp:
            from keepmix.training.sharding import full_state_dict

            weights = full_state_dict(model)
            if not self.main:
                return None
            model, _ = load_configured(self.cfg)
            missing, unexpected = model.load_state_dict(weights, strict=False)
            tied = {k for k in missing if k.endswith(("lm_head.weight", "embed_out.weight"))}
            if unexpected or set(missing) - tied:
                raise KeepmixError(f"gathered weights do not match the model (missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]})")
            model.tie_weights()
        return save_final(model, self.tokenizer, out, merge_lora=merge) if self.main else None

    def lr_scheduler(self, optimizer):
        return _lr_scheduler(optimizer, self.cfg.train)

    # ---- the end --------------------------------------------------------------------------------
    def target_metrics(self) -> list[str]:
        """What the run trains for: its tasks' scores (lm_eval tasks are retention probes, not targets), else
        the token accuracy of the source the schedule ends heaviest on."""
        probes = tuple(f"task/{t.name}/" for t in self._tasks if t.kind == "lm_eval")
        tasks = [k for k in self.last_retention
                 if k.startswith("task/") and not k.endswith("/n") and not k.startswith(probes)]
        if tasks:
            return tasks
        schedule = self.cfg.mixture.schedule
        if not schedule:
            return []
        final = schedule[-1].weights
        return [f"valid/{max(final, key=final.get)}/token_acc"]

    def finish(self, status: str, final_dir: Path | None = None) -> None:
        from keepmix.eval.retention import summary_line

        st = self.state
        wall = self.now()
        summary = summary_line(self.last_retention, self.target_metrics()) if self.last_retention else None
        record = {"kind": "end", "step": st.step, "tokens_seen": st.tokens_seen, "time": round(wall, 3),
                  "wall_s": round(wall, 3), "tokens_per_s": st.tokens_seen / max(wall, 1e-9), "status": status,
                  "packing": st.tokens_seen / max(st.step * self.cfg.train.batch_size * self.cfg.train.seq_len, 1),
                  "final_dir": str(final_dir) if final_dir else None, "summary": summary}
        if self._heap_guard is not None:  # how often kept freed memory had to be given back
            record["heap"] = self._heap_guard.record()
        self.log(record)
        if self._trackers is not None:
            self._trackers.finish()
        if self.main:
            self.progress.end(record)


@contextlib.contextmanager
def open_session(cfg: RunConfig, *, resume: bool, progress: str):
    from keepmix.report.progress import make_progress

    with make_progress(progress) as bar:
        session = Session(cfg, resume, bar)
        try:
            yield session
        except KeyboardInterrupt:
            session.finish("stopped")  # logs only once `begin` has committed the run directory
            raise
