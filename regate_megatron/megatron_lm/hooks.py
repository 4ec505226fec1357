"""The calls a patched Megatron-LM script makes (read ``megatron.training.get_args()``).

One place installs ReGATE into Megatron-LM's ``train()``: `install` rebinds
``megatron.training.training.get_forward_backward_func`` (which ``train()`` and
``evaluate()`` call) to return `ReGateForwardBackward` around the real schedule. It is
idempotent (a marker attribute), wraps the original, and does nothing until
``--regate`` is parsed.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import numpy as np

from regate_megatron.megatron_lm import sample_ids as _ids
from regate_megatron.megatron_lm.batch import BatchView, pretrain_vlm_view
from regate_megatron.megatron_lm.energon import EnergonView, shared_target_counts
from regate_megatron.megatron_lm.flags import check_args
from regate_megatron.megatron_lm.model import adopt_llava, language_model_of, regate_layer_spec
from regate_megatron.megatron_lm.state import ReGateState, carry_regate_state

__all__ = ["install", "language_layer_spec", "adopt_model", "with_sample_ids", "current",
           "loss_checks", "routable_spec_factory", "adopting_provider",
           "multimodal_energon_view"]


class _Run:
    """What one Megatron-LM process shares between the hooks."""

    def __init__(self, view: BatchView):
        self.view = view
        self.state: Optional[ReGateState] = None
        self.train_dataset = None
        self.llava = None  # what the adopted LLaVA model says: img_seq_len, image_token_index
        self.model = None  # the adopted model (its language model builds a reference store)


_RUN: Optional[_Run] = None


def current() -> _Run:
    if _RUN is None:
        raise RuntimeError("regate_megatron.megatron_lm.install() was not called before "
                           "pretrain(); see patches/README.md")
    return _RUN


def _args():
    from megatron.training import get_args

    return get_args()


def _enabled() -> bool:
    return bool(getattr(_args(), "regate", False))


def language_layer_spec(spec):
    """The script's language layer spec, routable with ``--regate`` (unchanged without)."""
    return regate_layer_spec(spec) if _enabled() else spec


def adopt_model(model):
    """The provider's model, routable and carrying the EMA state (unchanged without
    ``--regate``). Checks the flags first; builds the scorer now when a store is given."""
    args = _args()
    config = check_args(args)
    if not config.enabled:
        return model
    run = current()
    run.model = model
    if run.state is None:
        run.state = ReGateState(replicated=args.ckpt_format != "torch_dist")
        # torch_dist loads the EMA shards into the scorer's layout, so a store there is
        # opened now; the torch format keeps a loaded EMA until the first step builds it,
        # when the training data (and a store built from it) is there to check
        if (config.ref_store is not None and not run.state.replicated
                and _holds_store(config.ref_store)):
            run.state.attach(_build_scorer(args, run))
    adopt_llava(model, config)
    if hasattr(model, "img_seq_len"):
        run.llava = dict(img_seq_len=int(model.img_seq_len),
                         image_token=getattr(model, "image_token_index", None))
    return carry_regate_state(model, run.state)


def with_sample_ids(dataset):
    """The training dataset with stable ``sample_ids`` (`SampleIdDataset`), remembered for
    the target counts of ``--regate-selector random``."""
    wrapped = _ids.with_sample_ids(dataset)
    if _RUN is not None and wrapped is not None and _RUN.train_dataset is None:
        _RUN.train_dataset = wrapped
    return wrapped


def _image_geometry(args, run: Optional[_Run] = None):
    """(slots per image tile, combined max length, padded under PP?) of the LLaVA run; the
    slots are what the adopted model says when there is one (``run``)."""
    from megatron.core.models.vision.clip_vit_model import get_num_image_embeddings

    max_length = args.decoder_seq_length or args.seq_length
    if run is not None and run.llava is not None:
        return run.llava["img_seq_len"], max_length, args.pipeline_model_parallel_size > 1

    # the call both scripts make (examples/multimodal's flags, pretrain_vlm's defaults)
    img_seq_len = get_num_image_embeddings(
        args.img_h, args.img_w, args.patch_dim, getattr(args, "vision_model_type", "clip"),
        getattr(args, "disable_vision_class_token", False), 1,
        pixel_shuffle=getattr(args, "pixel_shuffle", False),
        use_tile_tags=getattr(args, "use_tile_tags", False),
        max_num_tiles=getattr(args, "max_num_tiles", 0),
        tokenizer_type=getattr(args, "tokenizer_prompt_format", None))
    return img_seq_len, max_length, args.pipeline_model_parallel_size > 1


def multimodal_energon_view(task_encoder, **dataset_kwargs) -> EnergonView:
    """``examples/multimodal``'s batch view on Energon data (`EnergonView`): ids from the
    samples' restore keys over ``--data-path``'s train split, padding untrained (the
    tokenizer's pad token), the model's ``<image>`` id as the image placeholder, and, for
    ``--regate-selector random`` without a store, one counting pass through
    ``task_encoder()`` (the script's class; ``dataset_kwargs`` as the script passes them
    to Energon, e.g. ``image_decode="pil"``)."""
    def pad_token():
        from megatron.training import get_tokenizer

        return get_tokenizer().pad

    def image_token():
        llava = current().llava
        return None if llava is None else llava["image_token"]

    return EnergonView(task_encoder, data_path=lambda: _args().data_path, pad_token=pad_token,
                       image_token=image_token, **dataset_kwargs)


def _holds_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


def _energon(run: _Run) -> Optional[EnergonView]:
    return run.view if isinstance(run.view, EnergonView) else None


def _training_data(args, run: _Run):
    """(num_samples, texts(dp_rank, dp_size), fingerprint fields) of the training data, for
    the teacher pass; None for a map-style dataset no rank has built yet. Collective."""
    img_seq_len, max_length, _ = _image_geometry(args, run)
    mbs = args.micro_batch_size
    energon = _energon(run)
    if energon is not None:
        workers = getattr(args, "num_workers", 0) or 0
        return (energon.ids.num_samples,
                lambda dp_rank, dp_size, done: energon.text_batches(dp_rank, dp_size, workers,
                                                                    mbs, skip=done),
                energon.fingerprint(img_seq_len, max_length))
    import torch
    import torch.distributed as dist

    from regate_megatron.core.roles import is_selection_source
    from regate_megatron.training.parallel import summed

    dataset = run.train_dataset
    table = torch.zeros(dist.get_world_size(), 2, dtype=torch.long)  # [length, source lacks]
    table[dist.get_rank()] = torch.tensor([
        0 if dataset is None else len(dataset),
        int(dataset is None and is_selection_source())])
    table = summed(table)  # sync point
    lengths = set(table[:, 0].tolist()) - {0}
    if not lengths:
        return None
    if len(lengths) > 1:
        raise RuntimeError(f"the ranks' training datasets differ in length {sorted(lengths)}; "
                           f"sample ids must index one dataset")
    longest = lengths.pop()
    if int(table[:, 1].sum()):
        raise RuntimeError("--regate-build-ref-store reads the training data on each "
                           "data-parallel replica's TP rank 0 of the first pipeline stage; "
                           "one has no training dataset "
                           "(wrap it with regate_megatron.megatron_lm.with_sample_ids)")
    inner = getattr(dataset, "dataset", dataset)

    def share(dp_rank, dp_size, done):  # the replica's strided share, less the done ones
        indices = [i for i in range(dp_rank, longest, dp_size) if not done[i]]
        return _ids.text_batches(dataset, run.view, indices, mbs)

    return (longest, share,
            dict(data=type(inner).__name__, num_samples=longest, img_seq_len=img_seq_len,
                 max_length=max_length))


def _script_tokenizer():
    from megatron.training import get_tokenizer

    return get_tokenizer()


def _reference_store(args, run: _Run, tokenizer=None):
    """The opened ``--regate-ref-store``: built first with ``--regate-build-ref-store`` when
    missing (collective), checked against this run's data and tokenizer (default: the
    script's), and the process ended with ``--regate-build-ref-store-exit``."""
    import torch.distributed as dist

    from regate_megatron.megatron_lm import reference
    from regate_megatron.scoring.ref_store import RefLossStore

    path = args.regate_ref_store
    tokenizer = _script_tokenizer() if tokenizer is None else tokenizer
    data = None
    if getattr(args, "regate_build_ref_store", False) and not _holds_store(path):
        data = _training_data(args, run)
        if data is None or run.model is None:
            raise RuntimeError("--regate-build-ref-store: the training data or the model is "
                               "not there yet (the store is built at the first step)")
        num_samples, texts, fields = data
        lm = language_model_of(run.model)
        teacher = (f"the script's language model as loaded (--load {args.load}, "
                   f"--pretrained-checkpoint {getattr(args, 'pretrained_checkpoint', None)}, "
                   f"iteration {getattr(args, 'iteration', 0)})")
        img_seq_len, max_length, _ = _image_geometry(args, run)
        built = reference.build_reference_store(
            path, lm, texts, num_samples=num_samples, img_seq_len=img_seq_len,
            max_length=max_length, pad_id=reference.pad_id_of(tokenizer),
            mode=args.regate_teacher_visual,
            log=_log, stop_signal=_exit_signal(args),
            meta=dict(teacher=teacher,
                      tokenizer_sha256=reference.tokenizer_fingerprint(tokenizer),
                      dataset_fingerprint=reference.fingerprint(fields)))
        if built["stopped"]:  # preempted: the chunks so far stay for the next run
            raise SystemExit(0)
    store = RefLossStore.open(path)
    energon = _energon(run)
    if energon is not None and len(store) != energon.ids.num_samples:
        raise ValueError(
            f"--regate-ref-store {path} holds {len(store)} samples but {energon.data_path} "
            f"has {energon.ids.num_samples}; the store was built for other data")
    if store.meta.get("built_by") == reference.BUILT_BY:
        if data is None and (energon is not None or run.train_dataset is not None):
            data = _training_data(args, run)
        _check_built_store(store, data, tokenizer)
    if getattr(args, "regate_build_ref_store_exit", False):
        dist.barrier()
        _log(f"ReGATE: --regate-build-ref-store-exit: the store at {store.path} is ready; "
             f"exiting before training")
        raise SystemExit(0)
    return store


def _exit_signal(args):
    """The signal Megatron-LM's ``--exit-signal-handler`` exits on (``--exit-signal``,
    default SIGTERM), or None without the flag: the in-script build stops on it too."""
    import signal

    if not getattr(args, "exit_signal_handler", False):
        return None
    return getattr(args, "exit_signal", None) or signal.SIGTERM


def _check_built_store(store, data, tokenizer) -> None:
    """A store built in a script must match this run's tokenizer and (when known) data."""
    from regate_megatron.megatron_lm import reference

    rebuild = (f"remove {store.path} and run with --regate-build-ref-store to rebuild it for "
               f"this run")
    if store.meta["tokenizer_sha256"] != reference.tokenizer_fingerprint(tokenizer):
        raise ValueError(f"--regate-ref-store {store.path} was built with another tokenizer "
                         f"than this run's; {rebuild}")
    if data is not None and store.meta["dataset_fingerprint"] != reference.fingerprint(data[2]):
        raise ValueError(f"--regate-ref-store {store.path} was built for other training data "
                         f"or another sequence layout than this run's ({data[2]}); {rebuild}")


def _log(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _target_layout(args, run: _Run):
    """The reference store (`_reference_store`), or `TargetCounts` read off the training
    data: the Energon pass (`shared_target_counts`) or the map-style dataset's items
    (`_shared_counts`)."""
    from regate_megatron.scoring.scorer import TargetCounts

    energon = _energon(run)
    if args.regate_ref_store is not None:
        return _reference_store(args, run)
    if energon is not None:
        img_seq_len, max_length, _ = _image_geometry(args, run)
        return TargetCounts(shared_target_counts(
            energon, img_seq_len, max_length, num_workers=getattr(args, "num_workers", 0) or 0))
    return TargetCounts(_shared_counts(args, run))


def _shared_counts(args, run: _Run) -> np.ndarray:
    """Every sample's target count, for ``--regate-selector random`` without a store: each
    rank that holds the training dataset reads a strided share of its items (every item is
    read once in all), one all-reduce joins them. Collective; O(dataset) reads in all."""
    import time

    import torch
    import torch.distributed as dist

    from regate_megatron.training.parallel import summed

    rank, world = dist.get_rank(), dist.get_world_size()
    held = torch.zeros(2, world, dtype=torch.long)  # [holds a dataset, its length] per rank
    if run.train_dataset is not None:
        held[:, rank] = torch.tensor([1, len(run.train_dataset)])
    held = summed(held)  # sync point
    holders = [r for r in range(world) if int(held[0, r])]
    if not holders:
        raise RuntimeError("--regate-selector random without --regate-ref-store reads the "
                           "target counts off the training dataset: wrap it with "
                           "regate_megatron.megatron_lm.with_sample_ids")
    sizes = held[1]
    lengths = {int(sizes[r]) for r in holders}
    if len(lengths) != 1:
        raise RuntimeError(f"the ranks' training datasets differ in length {sorted(lengths)}; "
                           f"sample ids must index one dataset")
    n = lengths.pop()
    start = time.perf_counter()
    counts = np.zeros(n, dtype=np.int64)
    if run.train_dataset is not None:
        share = holders.index(rank)
        img_seq_len, max_length, _ = _image_geometry(args, run)
        counts = _ids.target_counts(run.train_dataset, run.view, img_seq_len, max_length,
                                    indices=range(share, n, len(holders)))
    counts = summed(torch.from_numpy(counts)).numpy()  # sync point
    if rank == 0:
        print(f"ReGATE: target counts of {n} samples read by {len(holders)} ranks in "
              f"{time.perf_counter() - start:.1f} s (--regate-ref-store reads them from the "
              f"store instead)", flush=True)
    return counts


def _build_scorer(args, run: _Run):
    return run.state.build_scorer(check_args(args), _target_layout(args, run),
                                  args.padded_vocab_size, seed=args.seed)


SPIKY_LOSS_FACTOR = 10  # a loss this many times the running maximum is a spike (as pretrain_gpt)


def loss_checks(args):
    """The checks a Megatron-LM script's own loss function makes on a micro-batch's loss
    (``--check-for-nan-in-loss-and-grad``, ``--check-for-spiky-loss``), through the rerun
    state machine, for the ReGATE loss that replaces it; None when both are off."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    nan, spiky = (getattr(args, name, False) for name in ("check_for_nan_in_loss_and_grad",
                                                           "check_for_spiky_loss"))
    if not (nan or spiky):
        return None

    def check(loss):
        machine = get_rerun_state_machine()
        if nan:
            for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                machine.validate_result(
                    result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                    message=f"found {what} in local forward loss calculation (ReGATE loss "
                            f"over the computed targets)")
        if spiky:
            machine.validate_result(
                result=loss, rejection_func=partial(machine.is_unexpectedly_large,
                                                    threshold=SPIKY_LOSS_FACTOR, context="loss"),
                message="Spiky loss (ReGATE loss over the computed targets)", tolerance=0.0,
                fatal=False)
    return check


def install(batch_view: BatchView = pretrain_vlm_view) -> None:
    """Route Megatron-LM's ``train()`` through ReGATE (call before ``pretrain``)."""
    global _RUN
    import megatron.training.training as training

    from regate_megatron.megatron_lm.step import ReGateForwardBackward

    if _RUN is None:
        _RUN = _Run(batch_view)
    original = training.get_forward_backward_func
    if getattr(original, "_regate", False):
        return

    def get_forward_backward_func(*args, **kwargs):
        inner = original(*args, **kwargs)
        if not _enabled():
            return inner
        run, margs = current(), _args()
        if run.state is None:
            raise RuntimeError("--regate is set but the model provider did not call "
                               "regate_megatron.megatron_lm.adopt_model(model)")
        img_seq_len, max_length, padded = _image_geometry(margs, run)
        return ReGateForwardBackward(
            inner, run.state, run.view, img_seq_len=img_seq_len, max_length=max_length,
            pad_to_max_length=padded, step_of=lambda: _args().curr_iteration,
            build_scorer=lambda: _build_scorer(_args(), run), check_loss=loss_checks(margs))

    get_forward_backward_func._regate = True
    training.get_forward_backward_func = get_forward_backward_func


def routable_spec_factory(factory):
    """A layer-spec factory whose plain `TransformerLayer` specs become routable with
    ``--regate`` (for scripts that build their specs in another module, e.g.
    ``examples/multimodal/model.py``). Other specs pass unchanged."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if getattr(factory, "_regate", False):
        return factory

    def make(*args, **kwargs):
        spec = factory(*args, **kwargs)
        if _enabled() and getattr(spec, "module", None) is TransformerLayer:
            return regate_layer_spec(spec)
        return spec

    make._regate = True
    return make


def adopting_provider(model_provider):
    """``model_provider`` followed by `adopt_model` on what it returns. Keywords the
    provider does not declare are not passed on: at ``core_v0.16.1`` Megatron-LM's
    ``get_model`` passes ``config=`` and ``pg_collection=``, which ``examples/multimodal``'s
    provider of that tag does not take (it builds its configs from the args; later tags
    declare them), so the stock script stops there with a TypeError."""
    import inspect

    if getattr(model_provider, "_regate", False):
        return model_provider
    params = inspect.signature(model_provider).parameters.values()
    declared = (None if any(p.kind is p.VAR_KEYWORD for p in params)
                else {p.name for p in params})

    def provider(*args, **kwargs):
        if declared is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in declared}
        return adopt_model(model_provider(*args, **kwargs))

    provider._regate = True
    return provider
