"""The ReGATE model pieces inside a Megatron-LM model provider.

`regate_layer_spec` turns the script's own decoder layer spec into a routable one (same
submodules, `ReGateTransformerLayer`, stock behaviour until a selection is routed);
`adopt_llava` makes the `LLaVAModel` (or `GPTModel`) the provider built route selections.
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from regate_megatron.config import ReGateConfig
from regate_megatron.core.layer import ReGateTransformerLayer
from regate_megatron.core.model import ReGateGPTModel

__all__ = ["regate_layer_spec", "adopt_llava", "language_model_of"]


def regate_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a decoder *layer* spec whose layer is `ReGateTransformerLayer`.

    Only plain `TransformerLayer` specs qualify (the ReGATE layer is one, plus a routing
    hook); a block spec, Mamba or a custom layer is refused with its name.
    """
    if not isinstance(spec, ModuleSpec) or spec.module not in (TransformerLayer,
                                                               ReGateTransformerLayer):
        name = getattr(getattr(spec, "module", None), "__name__", type(spec).__name__)
        raise ValueError(
            f"ReGATE routes TransformerLayer decoder layers; the language layer spec builds "
            f"{name} (--spec / --language-model-type give a layer ReGATE cannot route)"
        )
    out = copy.copy(spec)  # the submodules are shared, as Megatron's spec factories do
    out.module = ReGateTransformerLayer
    return out


def adopt_llava(model, regate_config: ReGateConfig):
    """Make ``model`` (a `LLaVAModel`, or a `GPTModel`) route selections, in place: its
    language model becomes a `ReGateGPTModel`. Its decoder must come from
    `regate_layer_spec`. Returns ``model``."""
    from regate_megatron.core.mllm import ReGateLLaVAModel

    lm = language_model_of(model)
    if lm is not None and not isinstance(lm, ReGateGPTModel):
        ReGateGPTModel.adopt(lm, regate_config)
    if isinstance(model, GPTModel):
        return model
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    if isinstance(model, LLaVAModel) and not isinstance(model, ReGateLLaVAModel):
        model.__class__ = ReGateLLaVAModel  # its forward takes token_selection= too
    return model


def language_model_of(model) -> Optional[GPTModel]:
    """The `GPTModel` inside a (DDP / Float16Module wrapped) LLaVA or GPT model; None on a
    stage that has no language model."""
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    if isinstance(model, GPTModel):
        return model
    return getattr(model, "language_model", None)
