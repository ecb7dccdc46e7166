"""Sparse recovery training: distil the dense teacher into the pruned student, mask held fixed.

A run is a list of phases. Without gradual pruning there is one phase at the student's own
mask; with ``gradual=(0.5, 0.65)`` and ``target_sparsity=0.8`` the phases prune to 50%, 65%
and 80% in turn (each re-pruning keeps every earlier pruned weight pruned). Each phase:
optional block-wise reconstruction (``blockwise.py``), then end-to-end knowledge distillation
(``step.py``: KL on logits with temperature, optional SquareHead hidden-state matching and
hard-label cross-entropy), AdamW, linear warm-up + cosine decay to a horizon fixed by a step
budget or fitted to a time budget (``schedule.py``), gradient accumulation, optional bf16
autocast.

The run directory ``out`` is at every save a loadable checkpoint plus the training state
(``state.py``, ``run_io.py``: optimizer, schedule position, data position, RNG state, history);
it is replaced atomically. The batch of micro-step k is a pure function of (seed, k) and nothing
else is random, so ``resume`` continues bit-for-bit where the run stopped. Ctrl-C (SIGINT)
finishes the current step, saves and stops; a second Ctrl-C aborts. Started by torchrun, a run spans
several processes with the same global batches (``distributed.py``; ``dist``).
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import UserError
from ..eval.perplexity import ppl_from_nll
from ..loading import save_checkpoint
from ..prune import magnitude_masks
from .blockwise import reconstruct_blocks_
from .data import TokenWindows, model_fingerprint, windows_fingerprint
from .losses import HiddenCapture, kd_loss, next_token_nll
from .masks import MASK_FILE, Masks, apply_masks_, mask_sparsity, masks_to
from .prune_bridge import prune_with_project_method
from .run_io import check_out, load_run, write_run
from .schedule import PhaseHorizon, TimeBudget, fixed_horizons, lr_at
from .state import TrainState
from .step import kd_step, set_trainable_


@dataclass
class RecoverConfig:
    """Every setting of a recovery run. Fields in ``RUNTIME_FIELDS`` may change on resume; the rest may not."""

    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0
    hidden_weight: float = 0.0
    ce_weight: float = 0.0
    steps: Optional[int] = None        # end-to-end optimizer steps over all phases (the schedule's horizon)
    max_tokens: Optional[int] = None   # or: end-to-end tokens -> steps
    block_epochs: int = 0              # block-wise reconstruction epochs per phase (0: off)
    block_windows: int = 32
    block_batch: int = 2
    block_lr: float = 2e-4
    gradual: Tuple[float, ...] = ()    # intermediate sparsities before target_sparsity
    target_sparsity: Optional[float] = None
    prune_method: str = "magnitude"
    train_embeddings: bool = False
    bf16: bool = False
    seed: int = 0
    heldout_windows: int = 8
    teacher_topk: int = 0              # > 0: KD on the teacher's top-k + tail bucket (what --teacher-cache stores)
    kd_answers_only: bool = False      # KD only where the windows' loss_mask says (answers of chat samples)
    # runtime: may differ between a run and its resume
    max_minutes: Optional[float] = None
    stop_after: Optional[int] = None   # pause after this many end-to-end steps in total (saves; resumable)
    eval_every: int = 50
    save_every_minutes: float = 10.0
    snapshot_minutes: Tuple[float, ...] = ()  # also keep the student as it was at these training minutes
    unseen_passages: int = 0           # > 0: perplexity on this many fiction passages at every evaluation

    RUNTIME_FIELDS = ("max_minutes", "stop_after", "eval_every", "save_every_minutes", "snapshot_minutes",
                      "unseen_passages")
    # fields added later: left out of the identity at their default, so older runs still resume
    LATER_FIELDS = {"teacher_topk": 0, "kd_answers_only": False}

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v is None:
                return
            if v < 0 or (v == 0 and not allow_zero):
                raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

        for n in ("seq_len", "batch_size", "grad_accum", "lr", "temperature", "steps", "max_tokens",
                  "block_windows", "block_batch", "block_lr", "max_minutes", "eval_every", "save_every_minutes",
                  "heldout_windows"):
            positive(n)
        for n in ("warmup_steps", "weight_decay", "grad_clip", "kd_weight", "hidden_weight", "ce_weight",
                  "block_epochs", "stop_after", "min_lr_ratio", "teacher_topk", "unseen_passages"):
            positive(n, allow_zero=True)
        if self.kd_weight == 0 and self.hidden_weight == 0 and self.ce_weight == 0:
            raise UserError("all loss weights are zero")
        if self.steps is None and self.max_tokens is None and self.max_minutes is None:
            raise UserError("give a budget: --steps, --max-tokens or --max-minutes")
        if self.gradual:
            if self.target_sparsity is None:
                raise UserError("gradual pruning needs a target sparsity (--sparsity)")
            seq = list(self.gradual) + [self.target_sparsity]
            if any(not 0.0 < s < 1.0 for s in seq) or any(b <= a for a, b in zip(seq, seq[1:])):
                raise UserError(f"gradual sparsities must increase within (0, 1) up to the target: {seq}")
        elif self.target_sparsity is not None and not 0.0 < self.target_sparsity < 1.0:
            raise UserError(f"sparsity must be in (0, 1), got {self.target_sparsity}")

    def identity(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_FIELDS:
            d.pop(k)
        for k, default in self.LATER_FIELDS.items():
            if d[k] == default:
                d.pop(k)
        d["gradual"] = list(d["gradual"])
        return d

    def phase_sparsities(self) -> List[Optional[float]]:
        if self.gradual:
            return list(self.gradual) + [self.target_sparsity]
        return [self.target_sparsity]  # None: keep the student's own mask


class _StopFlag:
    """SIGINT sets a flag (the loop saves and stops after the current step); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def default_reprune(student, sparsity: float, method: str, calib_ids: torch.Tensor, old_masks: Optional[Masks]) -> Masks:
    """Re-prune ``student`` to ``sparsity``; earlier pruned weights stay pruned. Returns the new masks."""
    if method == "magnitude":
        masks = magnitude_masks(student, sparsity)
    else:
        masks = prune_with_project_method(student, sparsity, method, calib_ids)
    if old_masks is not None:
        masks = {k: masks[k] & old_masks[k] for k in masks}
    return masks


class Recovery:
    """One recovery run (see the module docstring). Use ``run()``; ``summary`` afterwards."""

    def __init__(self, teacher, student, tokenizer, windows: TokenWindows, cfg: RecoverConfig, out,
                 masks: Optional[Masks] = None, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, student_source: str = "student", extra_meta: Optional[dict] = None,
                 reprune: Callable = default_reprune, log: Callable[[str], None] = None,
                 extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None, save_format: str = "dense",
                 teacher_cache=None, dist=None):
        cfg.validate()
        if windows.seq_len != cfg.seq_len:
            raise UserError(f"windows have {windows.seq_len} tokens, config says seq_len {cfg.seq_len}")
        if cfg.seq_len > teacher.config.max_seq_len:
            raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context of {teacher.config.max_seq_len}")
        self.teacher, self.student, self.tokenizer = teacher, student, tokenizer
        self.windows, self.cfg, self.out = windows, cfg, Path(out)
        self.progress, self.reprune, self.extra_meta = progress, reprune, dict(extra_meta or {})
        # extra_eval(model) -> metrics, run at every evaluation (e.g. a quick WikiText-2 ppl for a curve);
        # evaluation time is not charged to --max-minutes
        self.extra_eval = extra_eval
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        # dist: the process group of a run on several processes (distributed.py); None: one process
        self.dist = dist
        if dist is not None:
            dist.check_config(cfg, resume)
            if not dist.is_main:  # process 0 alone logs, shows progress, evaluates and saves
                self.progress, self.log = False, (lambda msg: None)
        self.device = next(student.parameters()).device
        self.student_source = student_source
        # checkpoint kind of the run directory and snapshots: the student's own (a sparse student is
        # trained densified with its mask held, and written back in its format with fp32 values)
        self.save_format = save_format
        if masks is None and not cfg.gradual:
            raise UserError(f"{student_source}: no sparsity mask given and no gradual pruning requested")
        self.masks = masks
        # teacher_cache: a TeacherCache of windows.train (teacher_cache.py); the KD step then reads the
        # teacher's top-k outputs (and block outputs) from it instead of running the teacher
        self.teacher_cache = teacher_cache
        self._check_targets(teacher_cache)
        self._unseen = None
        if cfg.unseen_passages:
            from ..eval.unseen import fiction_passages

            self._unseen = fiction_passages(tokenizer, cfg.unseen_passages, teacher.config.max_seq_len)
        self.identity = {
            "config": cfg.identity(),
            "teacher": model_fingerprint(teacher),
            "student": model_fingerprint(student),
            "data": windows_fingerprint(windows),
        }
        if dist is not None and dist.fsdp:  # its optimizer state stays sharded, unsaved: never resumed
            self.identity["fsdp_without_optimizer_state"] = True
        check_out(self.out, resume, overwrite)
        if dist is not None:  # every process has checked the run directory before process 0 writes it
            dist.barrier()
        self.state = TrainState()
        if resume:
            self.state, saved_masks = load_run(self.out, self.identity, self.student)
            if saved_masks is not None:
                self.masks = saved_masks
        self.budget = TimeBudget(cfg.max_minutes, spent_s=self.state.elapsed_s)
        self._last_save = time.time()
        self.stop_flag = _StopFlag()
        self.stop_reason: Optional[str] = None

    def _check_targets(self, cache) -> None:
        cfg = self.cfg
        if cfg.kd_answers_only and self.windows.loss_mask is None:
            raise UserError("--kd-answers-only: the training windows mark no answer tokens (teacher-written chat "
                            "text is needed: --text-mix ... teacher-chat=F, or the data-free default)")
        if cache is None:
            return
        settings = cache.meta.get("settings", {})
        want = {"topk": cfg.teacher_topk, "temperature": float(cfg.temperature), "bf16": cfg.bf16,
                "hidden": cfg.hidden_weight > 0}
        diffs = [f"{k} {settings.get(k)!r} (run: {v!r})" for k, v in want.items() if settings.get(k) != v]
        if cache.n_windows != self.windows.train.shape[0]:
            diffs.append(f"{cache.n_windows} windows (run: {self.windows.train.shape[0]})")
        if diffs:
            raise UserError(f"{cache.directory}: teacher-output cache made with other settings: " + ", ".join(diffs))

    def elapsed(self) -> float:
        """Training seconds so far (all sessions), evaluation excluded."""
        return self.budget.elapsed()

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    # ----- saving ----------------------------------------------------------------------
    def save(self, final: bool = False) -> None:
        if self.dist is not None and not self.dist.is_main:
            return
        st = self.state
        st.elapsed_s = self.elapsed()
        meta = dict(self.extra_meta)
        meta["mask_file"] = MASK_FILE
        meta["recovery"] = {
            "finished": st.finished, "phase": st.phase, "stage": st.stage, "steps": st.global_step,
            "tokens": st.tokens, "block_tokens": st.block_tokens, "elapsed_s": round(st.elapsed_s, 1),
            "sparsity": mask_sparsity(self.masks) if self.masks else None, "config": self.cfg.identity(),
            "source": self.windows.source,
        }
        history = {"config": dataclasses.asdict(self.cfg), "source": self.windows.source, "history": st.history}
        write_run(self.out, self.student, self.tokenizer, self.masks, st, self.identity, meta, history,
                  plot_title=f"recovery of {self.student_source}" if final else None, fmt=self.save_format)
        self._last_save = time.time()

    def _maybe_save(self) -> None:
        self._maybe_snapshot()
        if time.time() - self._last_save >= self.cfg.save_every_minutes * 60:
            self.save()

    def snapshot_dir(self, minutes: float) -> Path:
        """Where the student as of ``minutes`` of training is kept (beside the run directory)."""
        return self.out.parent / f"{self.out.name}.snapshot-{minutes:g}min"

    def _maybe_snapshot(self) -> None:
        """Save the student once training time passes each of ``snapshot_minutes`` (a dense checkpoint
        with its mask, beside the run directory; the run's state records which were taken)."""
        if self.dist is not None and not self.dist.is_main:
            return
        st = self.state
        for m in self.cfg.snapshot_minutes:
            if str(m) in st.snapshots or self.elapsed() < m * 60:
                continue
            info = {"minutes": m, "elapsed_s": round(self.elapsed(), 1), "steps": st.global_step,
                    "tokens": st.tokens, "block_tokens": st.block_tokens, "stage": st.stage}
            meta = dict(self.extra_meta)
            meta["recovery_snapshot"] = info
            save_checkpoint(self.student, self.tokenizer, self.snapshot_dir(m), self.save_format, "fp32",
                            extra_meta=meta, overwrite=True)
            st.snapshots[str(m)] = info
            self.log(f"snapshot at {m:g} min of training: {self.snapshot_dir(m)}")

    # ----- stopping ----------------------------------------------------------------------
    def _should_stop(self) -> bool:
        interrupted, exhausted = self.stop_flag.requested, self.budget.exhausted()
        if self.dist is not None:  # the same decision on every process
            interrupted, exhausted = self.dist.agree_stop(interrupted, exhausted)
        if interrupted:
            self.stop_reason = "interrupted"
            return True
        if exhausted:
            self.stop_reason = "time budget reached"
            return True
        return False

    def _stop_or_snapshot(self) -> bool:
        self._maybe_snapshot()
        return self._should_stop()

    # ----- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """Mean next-token NLL (-> perplexity) and KL to the teacher on the held-out windows."""
        ids = self.windows.heldout.to(self.device)
        amp = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)
        nll, kl, n = 0.0, 0.0, 0
        for i in range(0, ids.shape[0], self.cfg.batch_size):
            x = ids[i:i + self.cfg.batch_size]
            with amp:
                logits = model(x)
                t_logits = self.teacher(x) if model is not self.teacher else logits
            nll += next_token_nll(logits, x).item() * x.shape[0]
            kl += kd_loss(logits, t_logits, 1.0).item() * x.shape[0]
            n += x.shape[0]
        return {"heldout_ppl": ppl_from_nll(nll / n), "heldout_kl": kl / n}

    @torch.no_grad()
    def _unseen_eval(self, model) -> Dict[str, float]:
        """Perplexity on text of a kind the run never trains on (``eval/unseen.py``), if asked for."""
        if not self._unseen:
            return {}
        from ..eval.unseen import fiction_ppl

        amp = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)
        with amp:
            r = fiction_ppl(model, self.tokenizer, passages=self._unseen, batch_size=self.cfg.batch_size)
        return {"unseen_ppl": r.ppl}

    def _eval_record(self, label: str) -> None:
        if self.dist is not None and not self.dist.is_main:
            return
        t0 = time.time()
        st = self.state
        self.student.eval()
        rec = {"eval": label, "step": st.global_step, "tokens": st.tokens, "block_tokens": st.block_tokens,
               "phase": st.phase, "elapsed_s": round(self.elapsed(), 1)}
        rec.update(self.evaluate(self.student))
        rec.update(self._unseen_eval(self.student))
        if self.extra_eval is not None:
            rec.update(self.extra_eval(self.student))
            self.student.eval()
        st.history.append(rec)
        self.log(f"[eval] {label}: step {rec['step']} tokens {rec['tokens']:,} held-out ppl {rec['heldout_ppl']:.3f} "
                 f"KL {rec['heldout_kl']:.4f}"
                 + (f" unseen-text ppl {rec['unseen_ppl']:.3f}" if "unseen_ppl" in rec else "") + "".join(f" {k} {v:.3f}" for k, v in rec.items()
                                                     if k.startswith("x_") and isinstance(v, float)))
        self.budget.exclude(time.time() - t0)

    def _eval_teacher(self) -> None:
        if self.dist is not None and not self.dist.is_main:
            return
        t0 = time.time()
        t = self.evaluate(self.teacher)
        rec = {"eval": "teacher", "step": 0, "tokens": 0, "block_tokens": 0, "phase": 0,
               "heldout_ppl": t["heldout_ppl"], "heldout_kl": 0.0, "elapsed_s": 0.0}
        rec.update(self._unseen_eval(self.teacher))
        if self.extra_eval is not None:
            rec.update(self.extra_eval(self.teacher))
        self.state.history.append(rec)
        self.log(f"[eval] teacher held-out ppl {t['heldout_ppl']:.3f}")
        self.budget.exclude(time.time() - t0)

    # ----- the run ------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if st.finished:
            self.log(f"{self.out}: run already finished")
            return self.summary()
        exhausted = self.budget.exhausted()
        if self.dist is not None:
            exhausted = self.dist.agree_stop(False, exhausted)[1]
        if exhausted:
            self.log(f"{self.out}: time budget of {cfg.max_minutes:g} min already spent (raise --max-minutes to go on)")
            self.stop_reason = "time budget reached"
            return self.summary()
        phases = cfg.phase_sparsities()
        if not st.history:
            self._eval_teacher()
        with self.stop_flag:
            while st.phase < len(phases) and not self._should_stop():
                ph = st.phase
                if st.stage == "prune":
                    self._prune_stage(phases[ph])
                if st.stage == "block":
                    if not self._block_stage():
                        break
                if st.stage == "kd":
                    if not self._kd_stage(ph, len(phases)):
                        break
                    self._eval_record(f"end of phase {ph}")
                    st.next_phase()
            if st.phase >= len(phases):
                st.finished = True
        if self.stop_reason:
            self.log(f"stopped: {self.stop_reason} (resume with --resume)")
            self._eval_record(f"stop ({self.stop_reason})")
        self.save(final=True)
        if self.dist is not None:  # the run directory is complete when any process returns
            self.dist.barrier()
        return self.summary()

    def _prune_stage(self, sparsity: Optional[float]) -> None:
        st = self.state
        if sparsity is not None:
            calib = self._block_ids()
            self.masks = self.reprune(self.student, sparsity, self.cfg.prune_method, calib, self.masks)
            self.log(f"phase {st.phase}: pruned to {mask_sparsity(self.masks):.4f} ({self.cfg.prune_method})")
        if self.dist is not None:  # process 0's mask and weights everywhere
            self.masks = self.dist.broadcast_masks(self.masks)
            self.dist.broadcast_module_(self.student)
        apply_masks_(self.student, self.masks)
        st.stage = "block" if self.cfg.block_epochs > 0 else "kd"
        self._eval_record(f"phase {st.phase} start")

    def _block_ids(self) -> torch.Tensor:
        n = self.windows.train.shape[0]
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + 17 + self.state.phase)
        return self.windows.train[torch.randperm(n, generator=g)[: min(n, self.cfg.block_windows)]]

    def _block_stage(self) -> bool:
        st, cfg = self.state, self.cfg
        ids = self._block_ids()

        def done(i, rec):
            rec = dict(rec, phase=st.phase, elapsed_s=round(self.elapsed(), 1))
            st.history.append(rec)
            st.block = i + 1
            st.block_tokens += rec["tokens"]
            self._maybe_save()

        self.student.eval()
        nxt = reconstruct_blocks_(self.teacher, self.student, masks_to(self.masks, self.device), ids, cfg.block_epochs,
                                  cfg.block_batch, cfg.block_lr, cfg.seed + 101 * st.phase, start_block=st.block,
                                  bf16=cfg.bf16, should_stop=self._stop_or_snapshot, on_block_done=done,
                                  progress=self.progress)
        if nxt < len(self.student.layers):
            st.block = nxt
            return False
        if self.dist is not None:  # every process reconstructed the same blocks; keep them bit-identical
            self.dist.broadcast_module_(self.student)
        st.stage, st.block = "kd", 0
        self._eval_record(f"phase {st.phase} after block reconstruction")
        return True

    def _fixed_horizon(self, ph: int, n_phases: int) -> Optional[int]:
        """This phase's share of a step budget (``--steps``, or ``--max-tokens`` in steps); None without one."""
        total = self.cfg.steps
        if total is None and self.cfg.max_tokens is not None:
            total = max(1, self.cfg.max_tokens // self.tokens_per_step)
        horizons = fixed_horizons(total, n_phases)
        return None if horizons is None else horizons[ph]

    def _progress_bar(self, total: Optional[int], initial: int, desc: str):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def _kd_stage(self, ph: int, n_phases: int) -> bool:
        """End-to-end distillation of phase ``ph`` up to its horizon; False if it stopped before."""
        cfg, st = self.cfg, self.state
        params = set_trainable_(self.student, cfg.train_embeddings)
        parallel = self.dist.wrap(self.student) if self.dist is not None else None
        sharded = parallel is not None and parallel.sharded
        opt = torch.optim.AdamW(params if parallel is None else parallel.optimizer_params(params), lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        if st.optimizer is not None:
            opt.load_state_dict(st.optimizer)
        masks = masks_to(self.masks, self.device)
        horizon = PhaseHorizon(st, ph, n_phases, self._fixed_horizon(ph, n_phases), self.budget,
                               self.tokens_per_step, self.log)
        cached = self.teacher_cache is not None
        captures = None
        if cfg.hidden_weight > 0:  # the teacher's block outputs come from the cache when it has them
            captures = (None if cached else HiddenCapture(self.teacher), HiddenCapture(self.student))
        bar = self._progress_bar(horizon.steps, st.phase_step, f"distillation phase {ph}")
        self.student.train()
        try:
            while not horizon.reached():
                if self._should_stop():
                    return False
                if cfg.stop_after is not None and st.global_step >= cfg.stop_after:
                    self.stop_reason = f"paused after {st.global_step} steps (--stop-after)"
                    return False
                t0 = time.time()
                lr = lr_at(st.phase_step, cfg.lr, cfg.warmup_steps, horizon.steps, cfg.min_lr_ratio)
                rows = [self.windows.batch_rows(st.micro_step + i, cfg.batch_size, cfg.seed) for i in range(cfg.grad_accum)]
                if self.dist is not None:  # this process's slice of the same global batch
                    rows = self.dist.local_rows(rows, cfg.batch_size)
                batches = [self.windows.train[r].to(self.device) for r in rows]
                targets = [self.teacher_cache.targets(r, self.device) for r in rows] if cached else None
                loss_masks = ([self.windows.loss_mask[r].to(self.device) for r in rows]
                              if cfg.kd_answers_only else None)
                parts = kd_step(self.student, self.teacher, opt, params, batches, lr, masks, cfg, captures,
                                teacher_targets=targets, loss_masks=loss_masks, parallel=parallel)
                st.micro_step += cfg.grad_accum
                st.phase_step += 1
                st.global_step += 1
                st.tokens += self.tokens_per_step
                st.optimizer = None if sharded else opt.state_dict()
                dt = time.time() - t0
                if self.dist is not None:  # loss over the global batch; process 0's clock
                    parts, dt = self.dist.step_report(parts, dt)
                rec = {"step": st.global_step, "phase": ph, "tokens": st.tokens, "lr": lr,
                       "elapsed_s": round(self.elapsed(), 2), "step_s": round(dt, 3)}
                rec.update({k: round(v, 6) for k, v in parts.items()})
                st.history.append(rec)
                if horizon.observe(dt) and bar is not None:
                    bar.total = horizon.steps
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", tok_s=f"{self.tokens_per_step / max(dt, 1e-9):.0f}",
                                    lr=f"{lr:.2e}")
                if cfg.eval_every and st.global_step % cfg.eval_every == 0:
                    if sharded:
                        parallel.gather_()
                    self._eval_record(f"step {st.global_step}")
                    self.student.train()
                if not sharded:  # a sharded run saves when its stage ends
                    self._maybe_save()
            return True
        finally:
            if parallel is not None:  # (a sharded student's weights are gathered unless this is an error)
                parallel.close(gather=sys.exc_info()[0] is None)
            if bar is not None:
                bar.close()
            for cap in captures or ():
                if cap is not None:
                    cap.remove()
            self.student.eval()
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def summary(self) -> Dict[str, Any]:
        st = self.state
        evals = [h for h in st.history if "eval" in h]
        first = next((h for h in evals if h["eval"] != "teacher"), None)
        teacher = next((h for h in evals if h["eval"] == "teacher"), None)
        return {
            "out": str(self.out), "finished": st.finished, "stop_reason": self.stop_reason,
            "steps": st.global_step, "tokens": st.tokens, "block_tokens": st.block_tokens,
            "elapsed_s": round(self.elapsed(), 1), "sparsity": mask_sparsity(self.masks) if self.masks else None,
            "teacher_heldout_ppl": teacher["heldout_ppl"] if teacher else None,
            "start_heldout_ppl": first["heldout_ppl"] if first else None,
            "final_heldout_ppl": evals[-1]["heldout_ppl"] if evals else None,
            "final_unseen_ppl": evals[-1].get("unseen_ppl") if evals else None,
            "source": self.windows.source,
        }
