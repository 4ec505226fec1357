"""ReGATE inside Megatron-LM's own ``pretrain()`` loop: the pieces a script calls.

A Megatron-LM multimodal script (``pretrain_vlm.py``) changes by these lines
(``patches/`` holds them as add-only patches)::

    from regate_megatron import megatron_lm as regate

    # model_provider: the routable layer spec, then the routable model with its EMA state
    language_transformer_layer_spec = regate.language_layer_spec(language_transformer_layer_spec)
    model = LLaVAModel(...)
    model = regate.adopt_model(model)

    # datasets provider: stable sample ids (the dataset index)
    train_ds = regate.with_sample_ids(train_ds)

    # flags, and once per optimizer step around the schedule train() runs
    add_vlm_extra_args = regate.extra_args_provider(add_vlm_extra_args)
    regate.install(batch_view=regate.pretrain_vlm_view)
    pretrain(...)

``examples/multimodal/train.py`` (Energon data) rebinds its layer-spec factories and model
provider instead (`routable_spec_factory`, `adopting_provider`) and installs
``regate.multimodal_energon_view(TaskEncoder, image_decode="pil", ...)``: stable ids from
the Energon restore keys, target counts through the script's own task encoder.

Pieces: `flags` (``--regate-*``, refused settings), `model` (spec, adoption), `step`
(`ReGateForwardBackward`), `loss` (`regate_loss`), `state` (EMA in the model's checkpoint
state), `batch` / `sample_ids` (targets in the combined sequence, stable ids), `hooks`
(the Megatron-LM glue above), `energon` (stable ids and target counts on Energon data,
``examples/multimodal``), `reference` (``--regate-build-ref-store``: the reference-loss
store built by the script's own language model as loaded, at the first step).
``regate-train`` is built on the same pieces: its step is a
`ReGateForwardBackward` (view `expanded_view`), its loss `regate_loss`, its model adopted by
`adopt_llava` and its EMA saved by `carry_regate_state`.
"""

from regate_megatron.megatron_lm.batch import (
    TextBatch,
    expand_targets,
    expand_tokens,
    expanded_view,
    multimodal_train_view,
    pretrain_vlm_view,
)
from regate_megatron.megatron_lm.energon import EnergonIds, EnergonView, shared_target_counts
from regate_megatron.megatron_lm.flags import check_args, extra_args_provider
from regate_megatron.megatron_lm.hooks import (
    adopt_model,
    adopting_provider,
    install,
    language_layer_spec,
    multimodal_energon_view,
    routable_spec_factory,
    with_sample_ids,
)
from regate_megatron.megatron_lm.loss import KEPT_KEY, regate_loss
from regate_megatron.megatron_lm.model import adopt_llava, language_model_of, regate_layer_spec
from regate_megatron.megatron_lm.reference import build_reference_store
from regate_megatron.megatron_lm.sample_ids import SampleIdDataset, target_counts
from regate_megatron.megatron_lm.state import ReGateState, carry_regate_state
from regate_megatron.megatron_lm.step import ReGateForwardBackward, StepInfo

__all__ = [
    "TextBatch", "expand_targets", "expand_tokens", "pretrain_vlm_view", "multimodal_train_view",
    "expanded_view",
    "check_args", "extra_args_provider",
    "install", "language_layer_spec", "adopt_model", "with_sample_ids",
    "routable_spec_factory", "adopting_provider", "multimodal_energon_view",
    "EnergonIds", "EnergonView", "shared_target_counts",
    "regate_loss", "KEPT_KEY", "regate_layer_spec", "adopt_llava", "language_model_of",
    "SampleIdDataset", "target_counts", "ReGateState", "carry_regate_state",
    "ReGateForwardBackward", "StepInfo", "build_reference_store",
]
