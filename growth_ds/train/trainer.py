"""Staged pretraining on DeepSpeed: train a small model, grow the whole training state at each stage
boundary inside the same job, keep training; metrics as JSON lines, atomic resumable checkpoints.

Run under any launcher that sets the torch.distributed env (``deepspeed``, ``torchrun``, ``srun``),
or as a single process. On CPU, DeepSpeed uses its CPU accelerator and gloo.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from growth_ds import atomic
from growth_ds.models import build_model, lm_loss
from growth_ds.models.schema import parameter_schema
from growth_ds.distributed.zero import grow_any, grow_engine, is_partitioned
from growth_ds.distributed.zero.dense import grow_dense_engine
from growth_ds.ops import LRSchedule, make_plan
from growth_ds.shapes import ModelShape
from growth_ds.train import deepspeed_engine as dse
from growth_ds.train.config import RunConfig, _lr_policy, fan_in, make_trigger
from growth_ds.train.metrics import MetricsLog, flops_per_token
from growth_ds.train.stop import EXIT_STOPPED, StopRequest

dist = dse.dist


class StoppedBySignal(SystemExit):
    """Raised on every rank after a stop signal and the checkpoint it asked for; exits with EXIT_STOPPED."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(EXIT_STOPPED)
        self.signal_name, self.step = signal_name, step


@dataclass
class Progress:
    """Everything besides the engine that a checkpoint must hold to resume exactly."""

    step: int = 0
    stage: int = 0
    tokens: int = 0
    flops: float = 0.0
    schedule_step: int = 0
    seconds: float = 0.0
    total_steps: int = 0   # the run's last step (``budget: flops`` re-plans it at each growth); 0: not yet set


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON, or a ValueError naming the file when it is truncated or corrupt."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e})") from e


def _tag_step(name: str) -> Optional[int]:
    """The step of a checkpoint tag ``stepNNNNNNNN`` (None for other names: ``_universal`` conversions)."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


class StagedTrainer:
    """One staged (or from-scratch) run. ``run_dir`` holds metrics.jsonl and checkpoints/."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data_dir: Path, progress_bar: bool = True):
        self.cfg, self.run_dir, self.data_dir = cfg, Path(run_dir), Path(data_dir)
        self.progress_bar = progress_bar
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---- set-up ---------------------------------------------------------------------------------
    def _on_rank0(self, what: str, fn) -> None:
        """Run ``fn`` on rank 0 while the others wait; if it raises, every rank raises (rank 0 its own error),
        instead of the others waiting at a barrier until the collective timeout."""
        err = None
        if self.rank == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                err = e
        failed = err is not None
        if self.world > 1:
            flag = torch.tensor([int(failed)], dtype=torch.int64, device=dse.comm_device())
            dist.all_reduce(flag)
            failed = bool(flag.item())
        if err is not None:
            raise err
        if failed:
            raise RuntimeError(f"{what} failed on rank 0 (its error is in rank 0's output)")

    def _prepare_data(self):
        from growth_ds.train.data import Batches, TokenStore, prepare_data

        self._on_rank0("preparing the data", lambda: prepare_data(
            {**self.cfg.data, "seed": self.cfg.data.get("seed", self.cfg.seed)}, self.data_dir))
        info = json.loads((self.data_dir / "data.json").read_text())
        vocab = info["stats"]["vocab_size"]
        for i, st in enumerate(self.cfg.stages):
            if st.shape.vocab_size != vocab:
                raise ValueError(f"stages[{i}].shape.vocab_size: {st.shape.vocab_size} does not match the "
                                 f"tokenizer's {vocab}")
        t = self.cfg.train
        self.train_tokens = TokenStore.open(info["train"])
        self.val_tokens = TokenStore.open(info["val"])
        self.batches = Batches(self.train_tokens, t["seq_len"], t["micro_batch_size"], self.cfg.seed,
                               self.rank, self.world)

    def _eval_set(self):
        from growth_ds.train.data import eval_batches

        t = self.cfg.train
        return list(eval_batches(self.val_tokens, t["seq_len"], t["micro_batch_size"], self.cfg.eval_batches()))

    # ---- engine ---------------------------------------------------------------------------------
    def _ds_config(self):
        return dse.ds_config(self.cfg.train, self.cfg.deepspeed)

    def _hidden_lr_scale(self, shape: ModelShape) -> Optional[float]:
        """``train.mup``: the hidden matrices' LR factor, first stage's width over this one's (μP for Adam:
        per-coordinate updates shrink as the fan-in grows); None without ``mup``."""
        if not self.cfg.train["mup"]:
            return None
        return self.cfg.stages[0].shape.d_model / shape.d_model

    def _new_engine(self, shape: ModelShape, fresh: bool, config: Optional[dict] = None):
        config = config or self._ds_config()
        if fresh:
            model = build_model(shape, seed=self.cfg.seed)
        else:
            model = dse.construct_model(shape, self.cfg.deepspeed["zero_stage"], config)
        return dse.build_engine(model, self.cfg.train, config, self._hidden_lr_scale(shape))

    def _new_schedule(self) -> LRSchedule:
        """The first stage's schedule over the whole run (its decay, if wsd, the run's last steps)."""
        t = self.cfg.train
        decay = int(round(t["decay_fraction"] * self.total_steps)) if t["schedule"] == "wsd" else 0
        return LRSchedule(self.cfg.stage_lr(0), t["warmup_steps"], self.total_steps, t["min_lr_ratio"],
                          kind=t["schedule"], decay_steps=decay, decay_shape=t["decay_shape"])

    def _replan(self, plan, stage_idx: int) -> None:
        """After a growth into ``stage_idx``: re-plan the run's end (``budget: flops``: from the FLOPs really
        spent) and the schedule by the plan's LR policy, to end at that step with the stage's peak LR."""
        p = self.progress
        self.total_steps = p.total_steps = self.cfg.total_steps(self.world, p.step, p.flops, stage_idx)
        self.schedule, p.schedule_step = plan.lr.apply(self.schedule, p.schedule_step,
                                                       steps_left=self.total_steps - p.step,
                                                       peak_lr=self.cfg.stage_lr(stage_idx))

    @torch.no_grad()
    def evaluate(self, engine) -> float:
        total, count = 0.0, 0
        for x, y in self.eval_set:
            x, y = dse.to_engine(engine, x, y)
            logits = engine(x)
            total += lm_loss(logits, y).item() * x.shape[0]
            count += x.shape[0]
        return total / count

    def _train_step(self, engine, lr: float) -> float:
        dse.set_lr(engine, lr)
        losses = []
        for _ in range(self.cfg.train["grad_accum"]):
            x, y = dse.to_engine(engine, *next(self.batches))
            loss = lm_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item()

    # ---- growth ---------------------------------------------------------------------------------
    def grow(self, engine, shape: ModelShape, stage_idx: int):
        """Grow ``engine`` (of ``shape``) into stage ``stage_idx``. Under ZeRO 1-3 every rank computes its own
        partitions of the grown weights and Adam state from the old partitions (``distributed.zero``, no
        gather); under ZeRO 0 one parameter at a time is grown on every rank. Returns (engine, shape, plan)."""
        if os.environ.get("GROWTH_DS_SIGNAL_IN_GROWTH") == str(self.rank):  # tests: a stop signal mid-growth
            os.kill(os.getpid(), signal.SIGTERM)
        stage = self.cfg.stages[stage_idx]
        g = stage.grow
        ligo = g.get("method") == "ligo"
        self.ligo_losses = self.growth_stats = None
        policy = _lr_policy(g) or ("restart" if ligo else None)
        plan = make_plan(shape, stage.shape, width=g.get("width") or ("lemon" if ligo else None),
                         depth=g.get("depth"), seed=g.get("seed", 0), moments=None if ligo else g.get("moments"),
                         lr=policy, positions=g.get("positions"), recipe=g.get("recipe"), **fan_in(g))
        new_shape = plan.grown_shape
        if g.get("reinit"):  # the control arm: the grown shape from a random init, a fresh optimizer
            new = self._new_engine(new_shape, fresh=True)
            self._replan(plan, stage_idx)
            dse.release_engine(engine)
            return new, new_shape, plan
        dse.link_optimizer_state(engine)
        if ligo:
            return self._grow_ligo(engine, shape, plan, g, stage_idx)
        new = self._new_engine(new_shape, fresh=False)
        dse.materialise_optimizer_state(new, self.eval_set[0])
        self.growth_stats = grow_any(engine, new, plan)  # ZeRO 1-3: shard to shard, no gather
        self._replan(plan, stage_idx)
        dse.release_engine(engine)
        return new, new_shape, plan

    def _executor_record(self) -> dict:
        """How the last growth ran: ZeRO-sharded (this rank's rounds, bytes exchanged, seconds) or gathered."""
        st = self.growth_stats
        if st is None:
            return {"kind": "gather"}
        return {"kind": "zero-sharded", "transport": st.transport, "rounds": st.rounds, "bytes_sent": st.bytes_sent,
                "bytes_received": st.bytes_received, "new_elements": st.new_elements,
                "seconds_exchange": round(st.seconds_exchange, 4), "seconds_compute": round(st.seconds_compute, 4)}

    def _grow_ligo(self, engine, shape: ModelShape, plan, g: dict, stage_idx: int):
        """LiGO (Wang et al. 2023): learn the growth operator for ``steps`` on the training stream with the
        small model frozen (data parallel: gradients averaged over ranks), then materialise the grown state.
        Operator steps consume tokens and FLOPs, counted in the run's compute. The operator's forward needs
        the small model on every rank (gathered one parameter at a time under ZeRO-3); the grown model is
        built under ZeRO 1-3 from the old partitions by the dense executor (``zero.dense``), never whole."""
        from growth_ds.ops.ligo import LigoOperator, materialise_state
        from growth_ds.train.ligo_fit import train_ligo
        from growth_ds.ops.state import TrainingState

        names = list(parameter_schema(shape))
        old_p = dse.named_params(engine)
        small = {n: dse.get_full(engine, old_p[n]) for n in names}  # one at a time (a collective under ZeRO-3)
        moments = g.get("moments", "fresh")
        op = LigoOperator(plan, small)
        world = self.world

        def all_reduce(t):
            if world > 1:
                dist.all_reduce(t)
                t /= world

        p = self.progress
        tps = self.cfg.tokens_per_step(self.world)
        step_flops = op.step_flops(tps, self.cfg.train["seq_len"])
        losses = train_ligo(op, self.batches, steps=int(g.get("steps", 100)), lr=float(g.get("ligo_lr", 1e-3)),
                            all_reduce=all_reduce)
        p.tokens += tps * len(losses)
        p.flops += step_flops * len(losses)
        new = self._new_engine(plan.grown_shape, fresh=False)
        dse.materialise_optimizer_state(new, self.eval_set[0])
        if is_partitioned(engine):  # per-rank partial products reduce-scattered to the new owners
            maps = op.dense_maps()
            del op, small
            if moments == "plan":  # the initialising plan's moment rule, shard to shard; the step is kept
                self.growth_stats = grow_engine(engine, new, plan, refresh=False)
                dse.set_step(new, dse.get_step(engine))
            grow_dense_engine(engine, new, maps, keep_moments=moments == "plan")
        else:  # ZeRO 0: every rank holds everything
            state = TrainingState(shape, small, step=dse.get_step(engine))
            if moments == "plan":
                state.exp_avg = {n: dse.get_full(engine, old_p[n], "exp_avg") for n in names}
                state.exp_avg_sq = {n: dse.get_full(engine, old_p[n], "exp_avg_sq") for n in names}
            grown = materialise_state(op, state, moments)
            del op, small
            new_p = dse.named_params(new)
            for name in parameter_schema(plan.grown_shape):
                dse.set_full(new, new_p[name], grown.params[name])
                dse.set_full(new, new_p[name], grown.exp_avg[name], "exp_avg")
                dse.set_full(new, new_p[name], grown.exp_avg_sq[name], "exp_avg_sq")
            dse.set_step(new, grown.step)
            dse.refresh_low_precision(new)
        self._replan(plan, stage_idx)
        self.ligo_losses = losses
        dse.release_engine(engine)
        return new, plan.grown_shape, plan

    # ---- checkpoints ----------------------------------------------------------------------------
    def latest(self) -> Optional[dict]:
        ptr = self.ckpt_dir / "latest.json"
        if not ptr.exists():
            return None
        meta = _read_json(ptr)
        if not (self.ckpt_dir / meta["tag"] / "growth_meta.json").exists():
            raise ValueError(f"{ptr}: points at {meta['tag']}, which is incomplete")
        return _read_json(self.ckpt_dir / meta["tag"] / "growth_meta.json")

    def save(self, engine, shape: ModelShape) -> None:
        p = self.progress
        tag = f"step{p.step:08d}"
        meta = {
            "tag": tag, "progress": p.__dict__, "shape": shape.to_dict(), "schedule": self.schedule.to_dict(),
            "batches": self.batches.state_dict(), "world_size": self.world,
            "zero_stage": self.cfg.deepspeed["zero_stage"], "precision": self.cfg.deepspeed["precision"],
            "trigger_buffer": list(self.trigger_buffer),
            "config": self.cfg.raw, "trigger": None if self.trigger is None else self.trigger.state_dict(),  # no RNG state: sampling is keyed by (seed, sample), growth by (seed, name)
        }
        ptr = self.ckpt_dir / "latest.json"
        if self.rank == 0 and not (ptr.exists() and _read_json(ptr).get("tag") == tag):
            # left by a crashed save or an earlier run (maybe at another world size), or the conversion of an
            # --init-from source's tag of this name: its files must not mix with (or stand for) this save's; the
            # latest checkpoint itself is never removed
            for stale in (tag, f"{tag}_universal"):
                shutil.rmtree(self.ckpt_dir / stale, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False,
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
        atomic.fsync_tree(self.ckpt_dir / tag)  # (every rank: its own files are flushed wherever it wrote them)
        dist.barrier()
        if self.rank == 0:  # meta, then the pointer: a checkpoint without both is never used
            # (each write also flushes its directory entry: the meta is durable before the pointer names it)
            atomic.write_json(self.ckpt_dir / tag / "growth_meta.json", meta, indent=1)
            atomic.write_json(ptr, {"tag": tag, "step": p.step}, indent=1)
            # keep the newest complete checkpoints up to this one; never this one, never a newer-numbered tag
            # (an earlier run's), never an incomplete one
            done = sorted((_tag_step(d.name), d.name) for d in self.ckpt_dir.iterdir()
                          if d.is_dir() and _tag_step(d.name) is not None and _tag_step(d.name) < p.step
                          and (d / "growth_meta.json").exists())
            for _, old in done[:max(0, len(done) - (self.cfg.train["keep_last"] - 1))]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(self.ckpt_dir / f"{old}_universal", ignore_errors=True)
        dist.barrier()

    def _resume(self, meta: dict, ckpt_dir: Optional[Path] = None):
        """Rebuild the engine and everything else from checkpoint ``meta`` (in ``ckpt_dir``, default this run's).

        Same world size: DeepSpeed's own per-rank files. Another world size, or a universal checkpoint (e.g.
        one grown offline by ``growth-ds grow --from CKPT_DIR``): through DeepSpeed's universal format, converted
        first if needed (rank 0, once, next to the checkpoint); every parameter's shape is checked by name."""
        own = ckpt_dir is None
        ckpt_dir = Path(ckpt_dir or self.ckpt_dir)
        shape = ModelShape.from_dict(meta["shape"])
        prog = Progress(**meta["progress"])
        if prog.stage >= len(self.cfg.stages):
            raise ValueError(
                f"stages: the checkpoint is in stages[{prog.stage}] ({shape.describe()}), but the config lists "
                f"{len(self.cfg.stages)} stage(s); a run that continues it lists the stages it went through, with "
                f"that shape as stages[{prog.stage}] (after an offline growth: the source run's stages, then the "
                f"grown shape)")
        problem = shape.arch_mismatch(self.cfg.stages[prog.stage].shape)
        if problem:
            raise ValueError(f"stages[{prog.stage}].shape.{problem} (checkpoint vs config)")
        from growth_ds.distributed.zero.universal import is_universal, load_universal_checkpoint

        tag_dir = ckpt_dir / meta["tag"]
        universal = is_universal(tag_dir) or meta["world_size"] != self.world
        if universal:
            ckpt_dir, tag = self._universal(ckpt_dir, meta["tag"])
            config = self._ds_config()
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
            engine = self._new_engine(shape, fresh=False, config=config)
            load_universal_checkpoint(engine, ckpt_dir, tag)
        else:
            engine = self._new_engine(shape, fresh=False)
            engine.load_checkpoint(str(ckpt_dir), tag=meta["tag"], load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        self.schedule = LRSchedule.from_dict(meta["schedule"])
        self.batches.load_state_dict(meta["batches"])  # the sample stream continues at any world size
        self.progress = prog
        if prog.total_steps and own:  # this run's end as last planned (older: the config's)
            self.total_steps = prog.total_steps
        prog.total_steps = self.total_steps
        self.trigger = self._make_trigger()
        if self.trigger is not None and meta.get("trigger"):
            self.trigger.load_state_dict(meta["trigger"])
            self.trigger_buffer = list(meta.get("trigger_buffer") or [])
        return engine, shape

    def _universal(self, ckpt_dir: Path, tag: str):
        """``(dir, tag)`` of a universal form of checkpoint ``tag``: itself if it is one, else converted once
        by rank 0 into ``<tag>_universal`` in this run's checkpoint directory (next to the tag when it is this
        run's; never into another run's, which may be read-only). Written aside and renamed: never half there."""
        from growth_ds.distributed.zero.universal import is_universal, to_universal

        if is_universal(ckpt_dir / tag):
            return ckpt_dir, tag
        utag = f"{tag}_universal"
        dest = self.ckpt_dir

        def convert():
            if is_universal(dest / utag):
                return
            dest.mkdir(parents=True, exist_ok=True)
            staging = dest / f".{utag}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                to_universal(ckpt_dir / tag, staging, loadable=True)
                shutil.rmtree(dest / utag, ignore_errors=True)  # (an incomplete one)
                os.replace(staging, dest / utag)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._on_rank0(f"converting {ckpt_dir / tag} to the universal format", convert)
        return dest, utag

    def init_from(self, src: Path) -> dict:
        """Meta of the checkpoint a new run starts from (``--init-from``): a growth-ds run's checkpoint
        directory or a grown universal checkpoint (``growth-ds grow --from CKPT_DIR --out SRC``)."""
        from growth_ds.distributed.zero.universal import resolve_checkpoint

        tag_dir, meta = resolve_checkpoint(src)
        if meta is None:
            raise ValueError(f"--init-from {src}: {tag_dir} has no growth_meta.json (not written by growth-ds)")
        return dict(meta, tag=tag_dir.name), tag_dir.parent

    # ---- the loop -------------------------------------------------------------------------------
    def _boundary(self) -> bool:
        p = self.progress
        if p.stage + 1 >= len(self.cfg.stages):
            return False
        st = self.cfg.stages[p.stage]
        return (st.until_steps is not None and p.step >= st.until_steps) or \
            (st.until_tokens is not None and p.tokens >= st.until_tokens) or \
            (self.trigger is not None and self.trigger.fired is not None)

    def _make_trigger(self):
        """The online ``when: auto`` rule of the current stage (None for fixed boundaries)."""
        p = self.progress
        self.trigger_buffer = []
        if p.stage + 1 >= len(self.cfg.stages) or self.cfg.stages[p.stage].until_auto is None:
            return None
        return make_trigger(self.cfg.stages[p.stage].until_auto, self.cfg.stages[p.stage].shape.n_params,
                            self.cfg.stages[p.stage + 1].shape.n_params)

    def _auto_signal(self, rec: dict, shape: ModelShape, log: MetricsLog) -> None:
        """After a step: feed the trigger (``until: auto``) what its ``signal`` names. ``val``: each eval
        point's val loss; ``train``: the mean train loss of every ``every`` steps (``self.trigger_buffer``,
        checkpointed, so a resumed run feeds the same points)."""
        if self.trigger is None:
            return
        auto = self.cfg.stages[self.progress.stage].until_auto
        if auto.get("signal", "val") == "val":
            if "val_loss" in rec:
                self._auto_decision(shape, rec["val_loss"], log)
            return
        self.trigger_buffer.append(rec["train_loss"])
        if self.progress.step % int(auto.get("every", 25)) == 0:
            mean = sum(self.trigger_buffer) / len(self.trigger_buffer)
            self.trigger_buffer = []
            self._auto_decision(shape, mean, log)

    def _auto_decision(self, shape: ModelShape, loss: float, log: MetricsLog) -> None:
        """Feed the trigger this stage's position on its own curve (compute of the current shape over all
        tokens so far: lossless growth continues the curve) and log the decision with its fit."""
        if self.trigger is None:
            return
        p = self.progress
        position = flops_per_token(shape, self.cfg.train["seq_len"]) * p.tokens
        decision = self.trigger.update(position, loss, p.tokens)
        log.write({"event": "schedule", "step": p.step, "stage": p.stage, "tokens": p.tokens,
                   **json.loads(json.dumps(decision.to_dict(), default=float))})

    def run(self, resume: str = "auto", init_from: Optional[Path] = None) -> dict:
        """Train to ``train.total_steps``. ``resume``: auto (if a checkpoint exists), always, never.
        ``init_from``: a checkpoint directory to start from when this run has none of its own (its progress,
        schedule and data position carry over; at any world size)."""
        dse.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        t = self.cfg.train
        self.total_steps = self.cfg.total_steps(self.world)
        self.schedule = self._new_schedule()
        self._prepare_data()
        self.eval_set = self._eval_set()
        self.eval_tokens = sum(x.numel() for x, _ in self.eval_set)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from growth_ds.train.monitor import Monitor

        self.monitor = Monitor(self.cfg.raw.get("monitor"), self.run_dir, enabled=self.rank == 0)
        log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.rank == 0, sink=self.monitor.write)
        meta = self.latest() if resume != "never" else None
        own_checkpoint = meta is not None
        if resume == "always" and meta is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        if meta is not None:
            engine, shape = self._resume(meta)
            log.truncate_after(self.progress.step, self.progress.stage)
            self.monitor.truncate_after(self.progress.step)
        elif init_from is not None:
            init_meta, init_dir = self.init_from(Path(init_from))
            if self.rank == 0 and (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()
            engine, shape = self._resume(init_meta, init_dir)
            meta = init_meta
        if meta is not None:  # what was loaded, evaluated: a resume at another world size is checkable
            log.write({"event": "resume", "step": self.progress.step, "stage": self.progress.stage,
                       "world_size": self.world, "from_world_size": meta["world_size"],
                       "from": str(init_from) if not own_checkpoint else meta["tag"],
                       "val_loss": self.evaluate(engine)})
        else:
            if self.rank == 0 and (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()
            self.progress = Progress(total_steps=self.total_steps)
            self.trigger = self._make_trigger()
            shape = self.cfg.stages[0].shape
            engine = self._new_engine(shape, fresh=True)
        tokens_per_step = self.cfg.tokens_per_step(self.world)
        kill_at = int(os.environ.get("GROWTH_DS_KILL_AT_STEP", "0"))
        bar = None
        if self.progress_bar and self.rank == 0:
            from growth_ds.train.progress import ProgressOutput

            bar = ProgressOutput(self.cfg.name, self.total_steps, self.progress.step, t["log_every"])
        p = self.progress
        last_saved = p.step if own_checkpoint else -1
        t_start = time.time() - p.seconds
        stop = StopRequest().install()
        while p.step < self.total_steps:
            if self._boundary():
                if t["checkpoint_before_growth"] and last_saved != p.step:
                    self.save(engine, shape)
                    last_saved = p.step
                t0 = time.time()
                before = self.evaluate(engine)
                old_shape = shape
                engine, shape, plan = self.grow(engine, shape, p.stage + 1)
                after = self.evaluate(engine)
                p.stage += 1
                self.trigger = self._make_trigger()
                log.write({"event": "growth", "step": p.step, "stage": p.stage, "tokens": p.tokens,
                           "flops": p.flops, "from": old_shape.to_dict(), "to": shape.to_dict(),
                           "width": plan.width, "depth": plan.depth, "lr_policy": plan.lr.kind,
                           "method": self.cfg.stages[p.stage].grow.get("method", "fixed"),
                           "moments": self.cfg.stages[p.stage].grow.get("moments", plan.moments),
                           "ligo_losses": getattr(self, "ligo_losses", None),
                           "executor": self._executor_record(),
                           "val_loss_before": before, "val_loss_after": after, "seconds": time.time() - t0})
                if bar is not None:
                    bar.set_total(self.total_steps)
                    bar.write(f"grew at step {p.step}: {old_shape.describe()} -> {shape.describe()}; "
                              f"val loss {before:.4f} -> {after:.4f}")
            t0 = time.time()
            lr = self.schedule.lr(p.schedule_step)
            loss = self._train_step(engine, lr)
            dt = time.time() - t0
            p.step += 1
            p.schedule_step += 1
            p.tokens += tokens_per_step
            p.flops += flops_per_token(shape, t["seq_len"]) * tokens_per_step
            p.seconds = time.time() - t_start
            rec = {"event": "step", "step": p.step, "stage": p.stage, "tokens": p.tokens, "flops": p.flops,
                   "n_params": shape.n_params, "train_loss": loss, "lr": lr,
                   "lr_groups": [g["lr"] for g in dse.base_optimizer(engine).param_groups], "seconds": p.seconds,
                   "tokens_per_s": tokens_per_step / max(dt, 1e-9)}
            if p.step % t["eval_every"] == 0 or p.step == self.total_steps:
                rec["val_loss"] = self.evaluate(engine)
                rec["val_tokens"] = self.eval_tokens
            log.write(rec)
            self._auto_signal(rec, shape, log)
            if bar is not None:
                bar.update(p.step, p.stage, loss, lr, rec["tokens_per_s"], rec.get("val_loss"))
            if p.step % t["save_every"] == 0 or p.step == self.total_steps:
                self.save(engine, shape)
                last_saved = p.step
            if kill_at and p.step == kill_at:  # tests: simulate a job killed mid-stage
                os._exit(137)
            signum = stop.agreed(self.world, dse.comm_device())
            if signum is not None and p.step < self.total_steps:
                if last_saved != p.step:
                    self.save(engine, shape)
                name = signal.Signals(signum).name
                log.write({"event": "stopped", "signal": name, "step": p.step, "stage": p.stage})
                if bar is not None:
                    bar.write(f"{name}: stopped at step {p.step} after a complete checkpoint; the same command "
                              f"resumes it")
                    bar.close()
                self.monitor.close()
                stop.restore()
                dse.release_engine(engine)
                raise StoppedBySignal(name, p.step)
        stop.restore()
        if bar is not None:
            bar.close()
        self.monitor.close()
        result = {"step": p.step, "stage": p.stage, "tokens": p.tokens, "flops": p.flops,
                  "shape": shape.to_dict(), "val_loss": self.evaluate(engine)}
        dse.release_engine(engine)
        return result


def train(cfg: RunConfig, scratch: bool = False, resume: str = "auto", run_dir: Optional[Path] = None,
          progress_bar: bool = True, init_from: Optional[Path] = None) -> dict:
    """Run the staged job (or its from-scratch baseline) described by ``cfg``."""
    root = Path(cfg.out_dir)
    if scratch:
        cfg = cfg.scratch()
    run_dir = Path(run_dir) if run_dir else root / ("scratch" if scratch else "staged")
    data_cfg = dict(cfg.data)
    data_dir = Path(data_cfg.pop("out_dir", None) or root / "data")
    base = cfg.source.parent if cfg.source else Path.cwd()
    srcs = data_cfg.get("sources")
    if srcs is not None:
        from growth_ds.train.data import _resolve_source

        data_cfg["sources"] = [_resolve_source(s, base) for s in srcs] if isinstance(srcs, list) \
            else _resolve_source(srcs, base)
    cfg.data = data_cfg
    return StagedTrainer(cfg, run_dir, data_dir, progress_bar).run(resume, init_from)

