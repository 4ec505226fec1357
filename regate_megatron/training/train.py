"""`regate-train`: train an MLLM (Megatron-Core LLaVA) with ReGATE token elision.

    parse flags -> data -> reference losses (store or online teacher) -> parallelism ->
    model (+ DDP) -> optimizer, LR schedule -> scorer -> (resume) -> train loop -> final save
    (`Run.setup` lists the build steps in order).

One step of the loop, top to bottom (with --regate, score -> micro -> guard -> EMA is one
call of `regate_megatron.megatron_lm.ReGateForwardBackward`, the object a patched
Megatron-LM ``pretrain()`` runs too):
    schedule  rho_t = keep_ratio_at(step); this step's global batch (deterministic)
    score     one EMA lookup for the global batch; per micro-batch selection on the
              model-parallel group's first rank, broadcast to the whole TP x PP group
    micro     Megatron-Core's forward/backward schedule; loss (`regate_loss`) summed over
              computed target tokens and normalised per token across the global batch
    guard     one all-reduce: a NaN/inf loss or gradient on any rank stops every rank here,
              before the EMA update and the optimizer step (--check-for-nan-in-loss-and-grad)
    step      EMA update (one exchange) + optimizer step + LR schedule
    log       loss, rho, target tokens total/kept, layer-tokens, tokens/s
    eval      dense held-out loss and greedy-decode answer accuracy
    save      atomic checkpoint of finite parameters only, "latest" pointer last

Before step 1: --save is checked writable (stale iter_*.tmp removed), --metrics-jsonl
checked, and on --load the command line is reconciled with the checkpoint's flags
(`regate_megatron.training.resume`: continue consistently or refuse, naming both values).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from regate_megatron.core.mllm import llava_inputs
from regate_megatron.core.roles import is_logging_rank, is_loss_rank, is_selection_source
from regate_megatron.core.selection import TokenSelection
from regate_megatron.data.layout import num_image_tokens
from regate_megatron.data.llava import ConversationDataset, collate
from regate_megatron.data.sampler import batch_positions, local_microbatch_positions
from regate_megatron.data.tokenizer import SentencePieceTokenizer
from regate_megatron.megatron_lm import (
    ReGateForwardBackward,
    ReGateState,
    StepInfo,
    carry_regate_state,
    expanded_view,
    regate_loss,
)
from regate_megatron.scoring.teacher import teacher_inputs
from regate_megatron.training.arguments import parse_args
from regate_megatron.training.guard import check_grad_norm_finite, check_step_finite
from regate_megatron.training.model_config import model_args_dict, optimizer_config
from regate_megatron.training.model_provider import build_model
from regate_megatron.training.parallel import (
    collective_device,
    initialize_parallel,
    launch_env,
    rank_device,
    run_tool,
)
from regate_megatron.training.preemption import EarlyStop
from regate_megatron.training.resume import decay_horizon, run_state

__all__ = ["main", "padded_vocab_size", "Run"]


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of 128 x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _timeout_s(args: argparse.Namespace) -> float:
    """Collective timeout in seconds: --distributed-timeout-minutes (Megatron-LM's: 10 min)."""
    return 60.0 * (getattr(args, "distributed_timeout_minutes", None) or 10)


def log0(*parts) -> None:
    if is_logging_rank():
        print("[regate-train]", *parts, flush=True)


class Run:
    """Everything one training run holds; built by `setup`, advanced by `train_step`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.iteration = 0
        self.consumed_samples = 0  # the data position: a property of the run, not of DP size
        self.counters = dict(target_tokens=0.0, kept_target_tokens=0.0, layer_tokens=0.0,
                             dense_layer_tokens=0.0, train_seconds=0.0)
        self.regate_state: Optional[ReGateState] = None  # --regate: the scorer, in the model
        self.teacher_wait_s = 0.0

    @property
    def scorer(self):
        """The ReGATE scorer (None without --regate); held by the model's `ReGateState`."""
        return None if self.regate_state is None else self.regate_state.scorer

    # ------------------------------------------------------------------ build
    def setup(self) -> "Run":
        """Build the run, in a fixed order: each step needs the ones before it, and the data,
        the checkpoint's flags and the reference store are checked before Megatron's parallel
        state is brought up."""
        args = self.args
        self._check_start()                    # --load: resume or first run; --save, metrics
        self._build_data()                     # tokenizer, datasets, padded vocabulary
        notes = self._reconcile_with_checkpoint() if self.resuming else []  # flags vs --load
        world = self._open_reference()         # reference store or online teacher (its world)
        self._init_parallel(world)             # TP x PP x DP, device, seed
        for note in notes:
            log0(note)
        self._build_model()                    # build + pretrained weights + EMA state + bf16 + DDP
        self._build_optimizer()                # optimizer + LR schedule + config hooks
        if args.regate.enabled:
            self.regate_state.attach(self._build_scorer())  # scorer (EMA table) in the model
        self.forward_backward = self._build_step()  # the schedule, wrapped with --regate
        if self.resuming:
            self._resume()                     # model, optimizer, schedule, EMA, data position
        if self.channel is not None and is_logging_rank():
            # The teacher starts at the students' position: a resumed run's in-flight batch
            # is recomputed.
            self.channel.publish_start(self.iteration, self.consumed_samples)
        self._print_plan()
        return self

    def _check_start(self) -> None:
        """Resume or start fresh; --save and --metrics-jsonl usable (before any data)."""
        from regate_megatron.training.checkpoint import has_checkpoint

        args = self.args
        # --load = --save with no checkpoint there yet is a first run (Megatron-LM's rule; the
        # SLURM script always passes both, so a requeued job resumes in place).
        self.resuming = bool(args.load) and (args.load != args.save or has_checkpoint(args.load))
        if args.load and not self.resuming:
            log0(f"no checkpoint in {args.load} yet: starting from scratch")
        self._check_outputs()

    def _build_data(self) -> None:
        """Tokenizer, training and held-out datasets, padded vocabulary size."""
        args = self.args
        self.tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        if args.regate.enabled and args.regate.teacher_ranks:
            self._check_online_teacher()  # its tokenizer and architecture, before any data
        # Text-only runs (the teacher) keep the student's layout: the same image slots, which the
        # teacher view masks, so positions match what regate-precompute-ref scores later.
        self.image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)
        data_kw = dict(seq_length=args.seq_length, num_image_tokens=self.image_tokens,
                       image_size=(args.img_h, args.img_w), image_root=args.image_root,
                       skip_bad_samples=args.skip_bad_samples, load_images=not args.text_only)
        self.train_data = ConversationDataset(args.data_path, self.tokenizer, **data_kw)
        if self.train_data.num_skipped:
            log0(f"skipped {self.train_data.num_skipped} bad records of {args.data_path}")
        self.valid_data = (
            ConversationDataset(args.valid_data_path, self.tokenizer, **data_kw)
            if args.valid_data_path else None
        )
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size,
                                            args.tensor_model_parallel_size,
                                            args.make_vocab_size_divisible_by)
        args.vocab_size = self.vocab_size  # saved with the architecture in every checkpoint

    def _open_reference(self) -> dict:
        """The reference losses: a precomputed store, or the online teacher's channel. Returns
        the world `initialize_parallel` brings up: every rank ({}), or the student ranks."""
        args = self.args
        self.store = self.channel = None
        if args.regate.enabled and args.regate.teacher_ranks:
            return self._online_teacher(_timeout_s(args))
        if args.regate.enabled:
            from regate_megatron.scoring.scorer import open_reference

            # Teacher and student must share the tokenizer; checked here, before any compute.
            self.store = open_reference(args.regate, self.train_data, self.tokenizer)
        return {}

    def _init_parallel(self, world: dict) -> None:
        """Megatron's parallel state (TP x PP x DP over `world`), this rank's device, the seed."""
        from regate_megatron.training.optimizer_state import check_distrib_optim_sharding

        args = self.args
        if args.use_distributed_optimizer:
            check_distrib_optim_sharding(args.distrib_optim_sharding_type)
        initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            seed=args.seed, timeout_s=_timeout_s(args), **world)
        self.device = rank_device()  # where this rank's model, batches and selections live
        torch.manual_seed(args.seed)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def _build_model(self) -> None:
        """This rank's pipeline stage, pretrained weights, bf16, wrapped in Megatron's DDP."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )

        args = self.args
        module = build_model(args, self.vocab_size, regate_config=args.regate)
        self.config = module.config
        if args.language_model_checkpoint or args.vision_model_checkpoint:
            self._load_pretrained(module)
        if args.regate.enabled:  # the EMA table travels in the model's checkpoint state
            self.regate_state = ReGateState(replicated=False)  # torch_dist: DP-sharded
            carry_regate_state(module, self.regate_state)
        if args.bf16:  # as Megatron-LM: parameters in bf16, fp32 inputs/outputs cast at the ends
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(self.config, module)
        self.model = [DistributedDataParallel(
            self.config,
            DistributedDataParallelConfig(use_distributed_optimizer=args.use_distributed_optimizer,
                                          grad_reduce_in_fp32=args.bf16),
            module,
        )]

    def _build_optimizer(self) -> None:
        """Megatron's optimizer and LR schedule, and the config hooks its schedules call."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        args = self.args
        self.optimizer = get_megatron_optimizer(optimizer_config(args), self.model)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay_horizon(args),
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
            # --load: `resume.reconcile` already settled these flags against the checkpoint;
            # the checkpoint contributes its step count only.
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model[0].no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss

    def _check_online_teacher(self) -> None:
        """The online teacher's checkpoint shares our tokenizer, is a text-only GPT and fits its
        TP/PP (read from its common state alone; the teacher ranks check the same)."""
        from regate_megatron.scoring.online_teacher import TEACHER_FLAGS
        from regate_megatron.scoring.teacher_model import (
            check_teacher_parallel,
            teacher_architecture,
        )

        cfg = self.args.regate
        arch = teacher_architecture(cfg.teacher_load, self.tokenizer)
        check_teacher_parallel(arch, cfg.teacher_ranks, cfg.teacher_tensor_model_parallel_size,
                               cfg.teacher_pipeline_model_parallel_size, flags=TEACHER_FLAGS)

    def _online_teacher(self, timeout_s: float) -> dict:
        """Reference losses from the teacher ranks (`regate_megatron.scoring.online_teacher`);
        returns
        the students' own world for `initialize_parallel`."""
        from regate_megatron.scoring.online_teacher import (
            OnlineRefLosses,
            group_store,
            launch_store,
            student_channel,
        )

        cfg, launch = self.args.regate, launch_env()
        store = launch_store(timeout_s)
        self.channel, replicas = student_channel(self.args, store, launch.world_size)
        self.store = OnlineRefLosses(self.channel, self.train_data.target_counts(), replicas)
        self.teacher_replicas = replicas
        return dict(store=group_store(store, "students"), rank=launch.rank,
                    world_size=launch.world_size - cfg.teacher_ranks)

    def _check_outputs(self) -> None:
        """--save and --metrics-jsonl, before any data is read or step is trained."""
        from regate_megatron.training.checkpoint import prepare_save_dir
        from regate_megatron.training.metrics import check_metrics_file

        if self.args.save:
            prepare_save_dir(self.args.save, is_rank0=launch_env().rank == 0)
        check_metrics_file(self.args.metrics_jsonl, resuming=self.resuming)

    def _reconcile_with_checkpoint(self) -> List[str]:
        """The resume rule (`regate_megatron.training.resume`), before any tensor is loaded."""
        from megatron.core import dist_checkpointing

        from regate_megatron.training.checkpoint import checkpoint_path
        from regate_megatron.training.resume import reconcile

        path = checkpoint_path(self.args.load)
        try:
            common = dist_checkpointing.load_common_state_dict(path)
        except Exception as err:  # noqa: BLE001 -- any unreadable common state is named
            raise ValueError(f"--load {path}: cannot read the checkpoint's common state "
                             f"({type(err).__name__}: {err}); is it a regate-train checkpoint?"
                             ) from None
        return reconcile(self.args, common, path)

    def _load_pretrained(self, module) -> None:
        from regate_megatron.training.checkpoint import load_module_weights

        # A GPT / ViT checkpoint, or the language / vision part of an earlier LLaVA run.
        if self.args.language_model_checkpoint:
            lm = module if self.args.text_only else module.language_model
            load_module_weights(lm, self.args.language_model_checkpoint, ("", "language_model."))
        if self.args.vision_model_checkpoint and not self.args.text_only and module.vision_model:
            load_module_weights(module.vision_model, self.args.vision_model_checkpoint,
                                ("", "vision_model."))

    def _build_scorer(self):
        return self.regate_state.build_scorer(self.args.regate, self.store,
                                              self.tokenizer.vocab_size, seed=self.args.seed)

    def _resume(self) -> None:
        from regate_megatron.training.checkpoint import load_checkpoint

        # The EMA table comes with the model's state (`carry_regate_state`).
        common = load_checkpoint(self.args.load, self.model, self.optimizer, self.scheduler,
                                 sharding_type=self.args.distrib_optim_sharding_type)
        # The optimizer's saved param groups carry the old max/min lr (read by the scheduler):
        # the reconciled flags win (`resume.reconcile`), the step count is the checkpoint's.
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in (("max_lr", self.args.lr),
                                            ("min_lr", self.args.min_lr)) if k in group})
        self.scheduler.step(increment=0)
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common.get("consumed_samples",
                                               self.iteration * self.args.global_batch_size))
        self.counters.update(common.get("counters", {}))
        log0(f"resumed from {self.args.load} at iteration {self.iteration}")

    def save(self) -> None:
        from regate_megatron.training.checkpoint import save_checkpoint

        common = dict(args=model_args_dict(self.args), counters=dict(self.counters),
                      world_size=dist.get_world_size(), tokenizer_sha256=self.tokenizer.sha256,
                      consumed_samples=self.consumed_samples,
                      run_state=run_state(self.args))
        if self.scorer is not None:
            common["regate_state"] = True
        save_checkpoint(self.args.save, self.iteration, self.model, self.optimizer, self.scheduler,
                        common=common, sharding_type=self.args.distrib_optim_sharding_type)
        log0(f"saved iteration {self.iteration} to {self.args.save}")

    def _print_plan(self) -> None:
        args = self.args
        tokens = args.global_batch_size * args.seq_length
        line = (f"world {dist.get_world_size()} = TP {args.tensor_model_parallel_size} x PP "
                f"{args.pipeline_model_parallel_size} x DP {self.dp_size}; {args.num_microbatches} "
                f"micro-batches of {args.micro_batch_size}; {tokens} tokens/step; "
                f"{len(self.train_data)} training samples")
        if args.regate.enabled:
            from regate_megatron.scoring.schedule import mean_keep_ratio

            span = args.regate.layer_span(args.num_layers)
            mean_keep = mean_keep_ratio(args.regate, args.train_iters)
            line += (f"; ReGATE {args.regate.schedule} rho_min={args.regate.keep_ratio} over "
                     f"layers {span[0]}:{span[1]}, mean keep ratio {mean_keep:.3f}")
        if self.channel is not None:
            cfg = args.regate
            line += (f"; online teacher on {cfg.teacher_ranks} more ranks = TP "
                     f"{cfg.teacher_tensor_model_parallel_size} x PP "
                     f"{cfg.teacher_pipeline_model_parallel_size} x DP {self.teacher_replicas}")
        log0(line)

    # ------------------------------------------------------------------ data
    def micro_batches(self):
        """This rank's micro-batches of the next global batch and the global batch's sample
        ids: the `global_batch_size` samples after the run's consumed samples."""
        args = self.args
        positions = batch_positions(self.consumed_samples, len(self.train_data),
                                    args.global_batch_size, args.seed)
        global_ids = [self.train_data.sample_ids[p] for p in positions]
        local = local_microbatch_positions(positions, self.dp_rank, self.dp_size,
                                           args.micro_batch_size)
        batches = [collate([self.train_data[p] for p in mb], seq_length=args.seq_length,
                           pad_id=self.tokenizer.pad_id) for mb in local]
        return batches, global_ids

    def model_inputs(self, batch) -> dict:
        if self.args.text_only:
            view = teacher_inputs(batch, pad_id=self.tokenizer.pad_id,
                                  mode=self.args.regate.teacher_visual)
            return dict(input_ids=view["input_ids"], position_ids=view["position_ids"],
                        attention_mask=view["attention_mask"],
                        labels=view["labels"]), view["loss_mask"]
        return llava_inputs(batch, self.image_tokens, self.config.params_dtype), None

    # ------------------------------------------------------------------ one step
    def _build_step(self):
        """Megatron-Core's schedule; with --regate wrapped in `ReGateForwardBackward` (the
        object the Megatron-LM hook installs): the teacher's losses before the EMA lookup,
        the NaN/inf guard after the schedule and before the EMA update."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        inner = get_forward_backward_func()
        if not self.args.regate.enabled:
            return inner
        return ReGateForwardBackward(
            inner, self.regate_state, expanded_view, img_seq_len=self.image_tokens,
            max_length=self.args.seq_length, step_of=lambda: self.iteration,
            before_step=self._wait_for_teacher if self.channel is not None else None,
            after_schedule=lambda info: self._check_finite(info.records, info.global_ids,
                                                           info.local_slice.start))

    def _wait_for_teacher(self, step: int) -> None:
        """The online teacher's losses of this global batch (selection sources read them)."""
        self.teacher_wait_s = self.store.fetch(step) if is_selection_source() else 0.0
        if is_logging_rank():
            self.channel.ack(step, self.teacher_replicas)  # the teacher goes on to step + 1

    def _check_finite(self, records, global_ids, slot_offset: int) -> None:
        """--check-for-nan-in-loss-and-grad: collective; every rank stops at this step or none
        does, before the EMA update and the optimizer step."""
        if self.args.check_for_nan_in_loss_and_grad:
            check_step_finite(self.iteration + 1, records, slot_offset,
                              [int(i) for i in global_ids], self.model,
                              self.optimizer.param_groups[0]["lr"], contributes=is_loss_rank())

    def forward_step(self, data_iterator, model, records: list):
        """Megatron `forward_step_func`: one micro-batch forward. Its loss function is
        `regate_loss` over every target (a dense selection); under `ReGateForwardBackward`
        the step's selection routes the forward and `regate_loss` uses it instead."""
        batch = next(data_iterator).to(self.device)  # selections live on self.device too
        inputs, text_mask = self.model_inputs(batch)
        output = model(**inputs)
        if isinstance(output, tuple):
            loss, loss_mask = output  # LLaVA: [b, s] loss and the combined-sequence loss mask
        else:
            loss, loss_mask = output, text_mask
        # Off the last pipeline stage there is no loss mask and the loss function is not called.
        dense = None if loss_mask is None else TokenSelection.dense(loss_mask.bool())
        return loss, partial(regate_loss, dense, records)

    def train_step(self) -> dict:
        args = self.args
        start = time.perf_counter()
        batches, global_ids = self.micro_batches()
        records: list = []  # dense runs: (per-token loss, computed mask) per micro-batch
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        # --regate: select -> schedule -> guard -> EMA update, in ReGateForwardBackward
        self.forward_backward(
            forward_step_func=partial(self.forward_step, records=records),
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        if self.scorer is None:
            selections = [None] * len(batches)
            share = len(global_ids) // self.dp_size
            self._check_finite(records, global_ids, self.dp_rank * share)
        else:
            info: StepInfo = self.forward_backward.last
            selections, records = info.selections, info.records
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += args.global_batch_size
        seconds = time.perf_counter() - start
        return self._step_metrics(batches, selections, records, grad_norm, seconds, lr)

    def _step_metrics(self, batches, selections, records, grad_norm, seconds, lr) -> dict:
        """Global-batch numbers (one all-reduce over the world; only loss ranks contribute)."""
        args = self.args
        contributes = is_loss_rank()
        stats = torch.zeros(7, dtype=torch.float64)
        span = args.regate.layer_span(args.num_layers)
        routed = span[1] - span[0]
        if contributes:
            for batch, (loss, computed), selection in zip(batches, records, selections,
                                                          strict=True):
                targets = float(batch.loss_mask.sum())
                kept = targets if selection is None else float(
                    (batch.loss_mask.bool().to(computed.device) & selection.target_mask
                     & selection.keep_mask()).sum())
                seq_tokens = batch.tokens.numel()
                kept_tokens = (seq_tokens if selection is None
                               else float((selection.keep_index >= 0).sum()))
                stats += torch.tensor([
                    float((loss * computed).sum()), float(computed.sum()), targets, kept,
                    (args.num_layers - routed) * seq_tokens + routed * kept_tokens,
                    args.num_layers * seq_tokens, 0.0,
                ], dtype=torch.float64)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            stats[6] = 1.0
        stats = stats.to(collective_device())
        dist.all_reduce(stats)  # sync point: every rank learns the global numbers
        loss_sum, computed, targets, kept, layer_tokens, dense_layer_tokens, bad = stats.tolist()
        if bad and args.check_for_nan_in_loss_and_grad:  # the same verdict on every rank
            norm = float("nan") if grad_norm is None else float(grad_norm)
            check_grad_norm_finite(self.iteration, norm, lr, loss_sum / max(computed, 1.0))
        c = self.counters
        c["target_tokens"] += targets
        c["kept_target_tokens"] += kept
        c["layer_tokens"] += layer_tokens
        c["dense_layer_tokens"] += dense_layer_tokens
        c["train_seconds"] += seconds
        online = {} if self.channel is None else {"teacher_wait_s": self.teacher_wait_s}
        return {
            **online,
            "step": self.iteration,
            "lm_loss": loss_sum / max(computed, 1.0),
            "keep_ratio": self.scorer.keep_ratio if self.scorer is not None else 1.0,
            "target_tokens": targets,
            "kept_target_tokens": kept,
            "layer_tokens": layer_tokens,
            "dense_layer_tokens": dense_layer_tokens,
            "cum_kept_target_tokens": c["kept_target_tokens"],
            "cum_target_tokens": c["target_tokens"],
            "cum_layer_tokens": c["layer_tokens"],
            "tokens_per_s": args.global_batch_size * args.seq_length / max(seconds, 1e-9),
            "step_seconds": seconds,
            "elapsed": c["train_seconds"],
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
        }


def train(args: argparse.Namespace) -> Run:
    from regate_megatron.training.evaluation import evaluate
    from regate_megatron.training.metrics import MetricsLogger

    stop = EarlyStop(args)  # --exit-signal-handler, --exit-duration-in-mins, --exit-interval
    run = Run(args).setup()
    logger = MetricsLogger(args, start=run.iteration)
    while run.iteration < args.train_iters:
        metrics = run.train_step()                                      # schedule -> micro -> step
        if args.eval_interval and (run.iteration % args.eval_interval == 0
                                   or run.iteration == args.train_iters):
            metrics.update(evaluate(run))                                  # dense held-out eval
        logger.log(metrics)                                                # log
        if args.save and args.save_interval and run.iteration % args.save_interval == 0:
            run.save()                                                     # checkpoint
        if stop.requested(run.iteration):                                  # stop (all ranks)
            break
    if run.channel is not None and is_logging_rank():
        run.channel.finish()  # the teacher ranks stop
    if args.save and not (args.save_interval and run.iteration % args.save_interval == 0):
        run.save()
    stop.finish(run.iteration)  # the marker the batch script reads to requeue
    logger.close()
    return run


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:  # a bad --regate-* value, named by ReGateConfig
        print(f"regate-train: {err}", file=sys.stderr)
        return 2
    if args.regate.teacher_ranks:
        from regate_megatron.scoring.online_teacher import is_teacher_rank, run_teacher

        launch = launch_env()
        if is_teacher_rank(args, launch.rank, launch.world_size):
            return run_tool("regate-train (teacher rank)", lambda: run_teacher(args))
    return run_tool("regate-train", lambda: train(args))  # bad data/store/checkpoint: before step 1


if __name__ == "__main__":
    sys.exit(main())
