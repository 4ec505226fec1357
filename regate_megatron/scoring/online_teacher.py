"""The online teacher: its own ranks, one global batch ahead, streaming reference losses.

With ``--regate-teacher-ranks N`` the last N ranks of one torchrun/srun launch run the
frozen text-only teacher (`teacher_model.FrozenTeacher`, at its own TP x PP x DP) and the
other ranks are the students. Each group has its own default process group, so Megatron's
parallel state, the distributed optimizer, checkpoints and the EMA shards of the students
cover the student ranks only and behave exactly as without a teacher:

    launch rendezvous (MASTER_ADDR:MASTER_PORT): one c10d store for all ranks
      |-- PrefixStore "students/" -> students' gloo/NCCL world  (ranks 0 .. S-1)
      |-- PrefixStore "teacher/"  -> teacher's world            (ranks S .. S+N-1)
      `-- PrefixStore "channel/"  -> `TeacherChannel`: reference losses, acks, heartbeats

Who sends what when (step t; the sampler is deterministic, so the teacher knows every
global batch in advance):

    students (rank 0 = s0)                         teacher replicas (reporting rank of each)
    ---------------------------------------        -----------------------------------------
    s0: set start = (iteration, consumed) -------> read start
                                                   compute batch t0, set ref/t0/r  (each r)
    lookup ranks: wait ref/t/* (teacher_wait_s) <- ...
    s0: set fetched/t, delete ref/t-1/* ---------> wait fetched/t, then compute batch t+1
    train step t (forward/backward, EMA, opt)      ... set ref/t+1/r
    lookup ranks: wait ref/t+1/*            <----- (usually already there: no wait)
    ...
    s0: set done at the end -----------------------> stop
    every teacher rank: add heartbeat/<rank> each second; a student waiting for a batch
    stops with an error naming the teacher rank whose heartbeat is older than
    --regate-teacher-timeout (a dead or hung teacher never hangs the students)

Every teacher replica computes its contiguous share of the global batch and sends
``{sample_id: float16 losses}``: the values an offline store holds, so the scorer sees the
same numbers in both modes. Bitwise equality with an offline run holds when the teacher's
micro-batches are composed alike (e.g. `regate-precompute-ref --micro-batch-size 1` and
``--regate-teacher-micro-batch-size 1``; tests/test_online_teacher.py): otherwise the float32
sums differ with the batch shape (~1e-7 relative on CPU, TP2 vs TP1 alike), a float16 value
can move by one rounding step and a near-tie in the scores can pick another token. A resumed
run publishes its own start: the batch that was in flight is recomputed; the teacher's size
and TP/PP may change on resume.

Failures: a teacher rank that dies or stops (its process gone, SIGKILL) stops beating and is
named by the students; under torchrun/srun (--kill-on-bad-exit) the launcher also ends the
job. A teacher that is alive but slow is waited for (teacher_wait_s grows). The teacher
ranks, for their part, rely on the launcher when a student dies (they wait on the store).
"""

from __future__ import annotations

import argparse
import io
import signal
import threading
import time
from datetime import timedelta
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch.distributed as dist

__all__ = ["TeacherChannel", "OnlineRefLosses", "launch_store", "is_teacher_rank",
           "group_store", "run_teacher", "student_channel", "teacher_world", "TEACHER_FLAGS"]

TEACHER_FLAGS = ("--regate-teacher-tensor-model-parallel-size",
                 "--regate-teacher-pipeline-model-parallel-size")
_HEARTBEAT_S = 1.0
_POLL_S = 0.005


def is_teacher_rank(args: argparse.Namespace, rank: int, world_size: int) -> bool:
    """The last ``--regate-teacher-ranks`` ranks of the launch are the teacher's."""
    return rank >= world_size - args.regate.teacher_ranks


def launch_store(timeout_s: float = 600.0) -> dist.Store:
    """The launch's rendezvous store (torchrun's agent store, or rank 0's under srun)."""
    from regate_megatron.training.parallel import launch_env

    launch = launch_env()
    url = (f"tcp://{launch.master_addr}:{launch.master_port}?rank={launch.rank}"
           f"&world_size={launch.world_size}")
    store, _, _ = next(dist.rendezvous(url, timeout=timedelta(seconds=timeout_s)))
    return store


def group_store(store: dist.Store, group: str) -> dist.Store:
    """The store of one group's own world ("students" or "teacher")."""
    return dist.PrefixStore(f"regate/{group}/", store)


def _pack(losses: Dict[int, np.ndarray]) -> bytes:
    ids = np.array(sorted(losses), dtype=np.int64)
    counts = np.array([len(losses[i]) for i in ids], dtype=np.int64)
    values = (np.concatenate([np.asarray(losses[i], dtype=np.float16) for i in ids])
              if len(ids) else np.zeros(0, np.float16))
    buf = io.BytesIO()
    np.savez(buf, ids=ids, counts=counts, values=values)
    return buf.getvalue()


def _unpack(blob: bytes) -> Dict[int, np.ndarray]:
    with np.load(io.BytesIO(blob)) as f:
        ids, counts, values = f["ids"], f["counts"], f["values"]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return {int(i): values[bounds[k]:bounds[k + 1]] for k, i in enumerate(ids)}


class TeacherChannel:
    """Reference losses, acknowledgements and heartbeats through the launch's store."""

    def __init__(self, store: dist.Store, teacher_ranks: Sequence[int], timeout_s: float):
        self.store = dist.PrefixStore("regate/channel/", store)
        self.teacher_ranks = list(teacher_ranks)
        self.timeout_s = float(timeout_s)
        self._beats: Dict[int, Tuple[int, float]] = {}

    # ------------------------------------------------------------------ teacher side
    def start_heartbeat(self, rank: int) -> None:
        """Count up heartbeat/<rank> every second from a thread, until `stop_heartbeat`."""
        self._stop = threading.Event()

        def beat():
            while True:
                try:
                    self.store.add(f"heartbeat/{rank}", 1)
                except Exception:  # noqa: BLE001 -- the store is gone: the launch is ending
                    return
                if self._stop.wait(_HEARTBEAT_S):
                    return

        self._beat = threading.Thread(target=beat, name="regate-teacher-heartbeat", daemon=True)
        self._beat.start()

    def stop_heartbeat(self) -> None:
        """Stop and join the heartbeat thread (before the store and the process go away)."""
        if getattr(self, "_beat", None) is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None

    def read_start(self) -> Tuple[int, int]:
        self.store.wait(["start"], timedelta(days=1))  # the students load, maybe resume, first
        iteration, consumed = self.store.get("start").decode().split()
        return int(iteration), int(consumed)

    def put(self, step: int, replica: int, losses: Dict[int, np.ndarray]) -> None:
        self.store.set(f"ref/{step}/{replica}", _pack(losses))

    def wait_fetched(self, step: int) -> bool:
        """Wait until the students fetched step `step`; False when they finished instead."""
        while True:
            if self.store.check([f"fetched/{step}"]):
                return True
            if self.store.check(["done"]):
                return False
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ student side
    def publish_start(self, iteration: int, consumed_samples: int) -> None:
        self.store.set("start", f"{iteration} {consumed_samples}")

    def get(self, step: int, replicas: int) -> Tuple[Dict[int, np.ndarray], float]:
        """Step `step`'s reference losses from every teacher replica, and the seconds waited."""
        start = time.perf_counter()
        keys = [f"ref/{step}/{r}" for r in range(replicas)]
        checked = start
        while not self.store.check(keys):  # a cheap poll; heartbeats are read once a second
            if time.perf_counter() - checked >= _HEARTBEAT_S:
                self._check_heartbeats(step)
                checked = time.perf_counter()
            time.sleep(_POLL_S)
        waited = time.perf_counter() - start
        losses: Dict[int, np.ndarray] = {}
        for key in keys:
            losses.update(_unpack(self.store.get(key)))
        return losses, waited

    def ack(self, step: int, replicas: int) -> None:
        """Student rank 0: step `step` is fetched (the teacher may go on); the previous step's
        losses were fetched by every student (they all passed that step's collectives)."""
        self.store.set(f"fetched/{step}", "1")
        for r in range(replicas):
            self.store.delete_key(f"ref/{step - 1}/{r}")
        self.store.delete_key(f"fetched/{step - 2}")

    def finish(self) -> None:
        self.store.set("done", "1")

    def _check_heartbeats(self, step: int) -> None:
        now = time.monotonic()
        for rank in self.teacher_ranks:
            count = self.store.add(f"heartbeat/{rank}", 0)
            last = self._beats.get(rank)
            if last is None or count != last[0]:
                self._beats[rank] = (count, now)
            elif now - last[1] > self.timeout_s:
                raise RuntimeError(
                    f"teacher rank {rank} sent no heartbeat for {now - last[1]:.0f} s while the "
                    f"students wait for step {step + 1}'s reference losses: it died or hangs; "
                    f"see its log (--regate-teacher-timeout {self.timeout_s:g})")


class OnlineRefLosses:
    """The scorer's reference-loss store (``offsets``, ``store[sample_id]``), fed per step
    from the teacher ranks instead of a file."""

    def __init__(self, channel: TeacherChannel, target_counts: np.ndarray, replicas: int):
        self.channel, self.replicas = channel, replicas
        counts = np.asarray(target_counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [N + 1]
        self._losses: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def fetch(self, step: int) -> float:
        """Receive step `step`'s reference losses; returns the seconds waited."""
        self._losses, waited = self.channel.get(step, self.replicas)
        return waited

    def __getitem__(self, sample_id: int) -> np.ndarray:
        try:
            return self._losses[int(sample_id)]
        except KeyError:
            raise RuntimeError(f"sample {sample_id} is not in this step's batch from the teacher "
                               f"ranks") from None


def teacher_world(args: argparse.Namespace, launch_world: int) -> Tuple[List[int], int]:
    """The teacher's global ranks and its data-parallel replica count."""
    n = args.regate.teacher_ranks
    tp = args.regate.teacher_tensor_model_parallel_size
    pp = args.regate.teacher_pipeline_model_parallel_size
    return list(range(launch_world - n, launch_world)), n // (tp * pp)


def run_teacher(args: argparse.Namespace) -> None:
    """A teacher rank's life: its own world, the frozen teacher, then one global batch after
    another (the students' sampler), each sent to the students one step ahead."""
    from megatron.core import parallel_state as ps

    from regate_megatron.data.layout import num_image_tokens
    from regate_megatron.data.llava import ConversationDataset
    from regate_megatron.data.tokenizer import SentencePieceTokenizer
    from regate_megatron.scoring.teacher_model import (
        FrozenTeacher,
        check_teacher_parallel,
        teacher_architecture,
    )
    from regate_megatron.training.parallel import initialize_parallel, launch_env, rank_device

    cfg = args.regate
    if getattr(args, "exit_signal_handler", False):
        # The students turn the signal into "finish the step, save, exit 0" and then tell the
        # teacher (`finish`); a teacher killed by it would make srun (--kill-on-bad-exit) kill
        # the students mid-save.
        for name in {"SIGUSR1", getattr(args, "exit_signal", "SIGTERM")}:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    tp, pp = cfg.teacher_tensor_model_parallel_size, cfg.teacher_pipeline_model_parallel_size
    launch = launch_env()
    ranks, replicas = teacher_world(args, launch.world_size)
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    arch = teacher_architecture(cfg.teacher_load, tokenizer)
    check_teacher_parallel(arch, len(ranks), tp, pp, flags=TEACHER_FLAGS)
    dataset = ConversationDataset(
        args.data_path, tokenizer, seq_length=args.seq_length,
        num_image_tokens=num_image_tokens(args.img_h, args.img_w, args.patch_dim),
        image_size=(args.img_h, args.img_w),
        image_root=args.image_root, skip_bad_samples=args.skip_bad_samples, load_images=False)
    timeout_s = 60.0 * (getattr(args, "distributed_timeout_minutes", None) or 10)
    store = launch_store(timeout_s)
    channel = TeacherChannel(store, ranks, cfg.teacher_timeout)
    channel.start_heartbeat(launch.rank)  # first: the students time a silent rank from here on
    try:
        initialize_parallel(tp, pp, seed=args.seed, store=group_store(store, "teacher"),
                            rank=launch.rank - ranks[0], world_size=len(ranks),
                            timeout_s=timeout_s)
        teacher = FrozenTeacher(cfg.teacher_load, arch, pad_id=tokenizer.pad_id,
                                mode=cfg.teacher_visual, device=rank_device())
        _serve(args, channel, teacher, dataset, tokenizer.pad_id, ps.get_data_parallel_rank(),
               replicas)
        dist.barrier()  # sync point: the teacher's world ends together
    finally:
        channel.stop_heartbeat()  # before the store and this process go away


def _serve(args: argparse.Namespace, channel: TeacherChannel, teacher, dataset, pad_id: int,
           replica: int, replicas: int) -> None:
    """Compute and send this replica's share of every global batch, one step ahead."""
    from regate_megatron.data.llava import collate
    from regate_megatron.data.sampler import batch_positions
    from regate_megatron.scoring.teacher_model import micro_batch_groups

    cfg = args.regate
    mbs = cfg.teacher_micro_batch_size or args.micro_batch_size
    per_call = 1 if teacher.pp == 1 else 2 * teacher.pp  # micro-batches per schedule call
    start_iteration, consumed = channel.read_start()
    gbs = args.global_batch_size
    for step in range(start_iteration, args.train_iters):
        if step > start_iteration and not channel.wait_fetched(step - 1):
            return  # the students stopped early (preemption, --exit-interval)
        positions = batch_positions(consumed + (step - start_iteration) * gbs, len(dataset), gbs,
                                    args.seed)
        mine = np.array_split(np.asarray(positions), replicas)[replica].tolist()  # [gbs / DP]
        losses: Dict[int, np.ndarray] = {}
        for group in micro_batch_groups(mine, mbs, per_call):
            micro = [collate([dataset[p] for p in ids], seq_length=args.seq_length,
                             pad_id=pad_id) for ids in group]
            got = teacher.losses(micro)  # None off the last pipeline stage
            if teacher.reports:
                ids = [dataset.sample_ids[p] for ids in group for p in ids]
                losses.update(zip(ids, (v.astype(np.float16) for v in got), strict=True))
        if teacher.reports:
            channel.put(step, replica, losses)


def student_channel(args: argparse.Namespace, store: dist.Store,
                    launch_world: int) -> Tuple[TeacherChannel, int]:
    ranks, replicas = teacher_world(args, launch_world)
    return TeacherChannel(store, ranks, args.regate.teacher_timeout), replicas

