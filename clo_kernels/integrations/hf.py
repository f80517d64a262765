"""The parts of a Hugging Face causal LM that the fused loss needs, and a forward that feeds it.

The fused loss never calls a model's lm_head: it takes the backbone's final hidden states (after
the last norm) and the head's weight. ``split_lm`` finds both for any causal LM that ends in one
linear head, and refuses models whose logits are post-processed in ways the loss does not
reproduce (a logit scale) rather than train on the wrong objective.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, also under a peft wrapper (whose LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class SplitLM:
    """The parts of a causal LM the fused loss needs."""

    backbone: nn.Module    # returns last_hidden_state: the input of the lm_head
    head: nn.Linear        # weight (V, D), bias optional
    softcap: float | None  # final logit softcapping (Gemma 2)


def check_config(config) -> None:
    """ValueError if the model's logits are scaled (the loss reproduces softcapping, not a scale)."""
    for attr in ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            # Which way the scale goes differs by architecture (Granite divides by logits_scaling,
            # HyperCLOVA X multiplies): refuse rather than guess.
            raise ValueError(f"{config.model_type} scales its logits ({attr}={getattr(config, attr)}), which the "
                             "fused loss does not reproduce on any of its paths: it cannot train this model")


def split_lm(model: nn.Module) -> SplitLM:
    """Backbone, linear head and softcap of a causal LM (or its peft wrapper); ValueError naming
    what is missing for a model the fused loss cannot train."""
    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    check_config(config)
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output head of {type(base).__name__} is {type(head).__name__}, not nn.Linear: the "
                         "fused loss cannot train this model")
    backbone = getattr(base, base.base_model_prefix, None)
    if backbone is None or backbone is base:
        raise ValueError(f"cannot find the backbone of {type(base).__name__} (base_model_prefix "
                         f"{base.base_model_prefix!r}): the fused loss cannot train this model")
    return SplitLM(backbone, head, getattr(config, "final_logit_softcapping", None))


def model_problems(model, *, router_coef: Callable, processing_class=None, peft_config=None, init_kwargs=None,
                   trust_remote_code: bool = False) -> list[str]:
    """What rules the fused loss out for ``model`` (a causal LM, its peft wrapper, or the name or
    folder a trainer loads it from, with ``init_kwargs``), for a trainer to refuse by name before
    it builds anything: a processor for a tokenizer (a vision-language model), an encoder-decoder,
    what split_lm refuses, a Mixture-of-Experts router loss (``router_coef(text_config)``: the
    coefficient the trainer would add) and prompt-learning peft (virtual tokens)."""
    from transformers import AutoConfig, ProcessorMixin

    bad = []
    if isinstance(processing_class, ProcessorMixin):
        bad.append("a vision-language model (processing_class is a processor, not a tokenizer)")
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code,
                                            revision=(init_kwargs or {}).get("revision"))
    else:
        config = model.config
    text = config.get_text_config()
    if config.is_encoder_decoder:
        bad.append("an encoder-decoder model")
    else:
        try:
            if isinstance(model, str):
                check_config(text)
            else:
                split_lm(model)
        except ValueError as err:
            bad.append(str(err))
    if coef := router_coef(text):
        bad.append(f"a Mixture-of-Experts router loss (router_aux_loss_coef={coef}; set it to 0.0)")
    peft_configs = [peft_config] + list(getattr(model, "peft_config", {}).values())
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs if c is not None):
        bad.append("a prompt-learning peft method (virtual tokens shift the hidden states)")
    return bad


def one_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias):
    """(hidden, weight, bias) for the fused functions, which take one dtype. Under autocast they
    cast as F.linear does (_inputs.autocast_rule); outside it, hidden and bias take the weight's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    return hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)


HeadFn = Callable  # (hidden (S, T, D), weight (V, D), bias (V,) | None, softcap) -> anything


def add_hidden_head(model: nn.Module) -> None:
    """Patch ``model.forward`` (a transformers causal LM, or the base model inside a peft wrapper)
    so that ``model(input_ids=..., attention_mask=..., head_fn=fn)`` runs the backbone and
    returns ``fn(hidden, weight, bias, softcap)`` instead of logits; without ``head_fn`` the
    forward is unchanged (generation too). Calling the outermost wrapper keeps DDP's, FSDP2's
    and peft's hooks around the loss: under FSDP2 the head runs where the root unit's weight is
    gathered. Idempotent. Backbone and head are looked up on every call, since FSDP and peft
    replace parameters after patching; a deep copy or a pickle of the model carries the patch
    and runs its own weights."""
    if getattr(model.forward, "_clo_hidden_head", False):
        return
    model.forward = _ForwardWithHead(model, model.forward)


class _ForwardWithHead:
    """The patched ``model.forward`` of add_hidden_head. An object holding the model, not a
    closure over it: copy.deepcopy and pickle rebuild it around the copy (a closure would go on
    running the original model's weights, and pickles as a function it is not). The class's own
    forward is kept unbound and bound to the model on each call, for the same reason."""

    _clo_hidden_head = True

    def __init__(self, model: nn.Module, inner: Callable):
        self.model = model
        bound_here = getattr(inner, "__self__", None) is model
        self.unbound = inner.__func__ if bound_here else None
        self.other = None if bound_here else inner  # a forward someone else already replaced

    @property
    def __wrapped__(self) -> Callable:
        return self.unbound.__get__(self.model) if self.unbound is not None else self.other

    @property
    def __signature__(self) -> inspect.Signature:  # the model's own, for the Trainer's column checks
        return inspect.signature(self.__wrapped__)

    def __call__(self, *args, head_fn: HeadFn | None = None, **kwargs):
        if head_fn is None:
            return self.__wrapped__(*args, **kwargs)
        split = split_lm(self.model)
        kwargs["use_cache"] = False
        hidden = split.backbone(*args, **kwargs).last_hidden_state

        def head(hidden):
            weight, bias = split.head.weight, split.head.bias
            if hasattr(weight, "full_tensor"):  # a DTensor even inside the forward (tensor parallelism)
                weight = weight.full_tensor()
                bias = None if bias is None else bias.full_tensor()
            return head_fn(hidden.to(weight.device), weight, bias, split.softcap)

        return call_as_forward(split.head, head, hidden)


def call_as_forward(module: nn.Module, fn: Callable, *args):
    """fn(*args) run in place of ``module.forward``, through ``module(*args)``, so that the hooks
    a wrapper put on the module run around it and fn reads whole parameters, as the module's own
    forward would (Lightning's and TRL's "forward redirection"): FSDP2 gathers a head wrapped as
    its own unit and reduce-scatters its gradient; DeepSpeed ZeRO-3 fetches the partitions,
    which outside the module's forward are empty tensors, and reduces the gradient back onto
    them; accelerate's device_map hooks bring an offloaded head's weight in from the CPU or disk.
    Without such hooks it is fn(*args). The output's tensors pass through the hooks as a
    tuple (where ZeRO-3 attaches its backward hooks, as new tensors) and are put back in place."""
    slots = {}

    def forward(*inner_args):
        leaves: list[torch.Tensor] = []

        def take(t: torch.Tensor) -> _Slot:
            leaves.append(t)
            return _Slot(len(leaves) - 1)

        slots["template"] = _map_leaves(fn(*inner_args), take, torch.Tensor)
        return tuple(leaves)

    # accelerate's hooks (device_map offloading) wrap the instance's forward around _old_forward,
    # which they call between moving the weights in and out; elsewhere an instance attribute
    # shadows the class's forward.
    name = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    own = module.__dict__.get(name)
    setattr(module, name, forward)
    try:
        leaves = module(*args)
    finally:
        if own is None:
            delattr(module, name)
        else:
            setattr(module, name, own)
    return _map_leaves(slots["template"], lambda slot: leaves[slot.index], _Slot)


@dataclass(frozen=True)
class _Slot:
    index: int


def _map_leaves(x, fn, leaf: type):
    """x with fn applied to each ``leaf`` in it (in dicts, tuples, lists and dataclasses)."""
    if isinstance(x, leaf):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_leaves(v, fn, leaf) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [_map_leaves(v, fn, leaf) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _map_leaves(getattr(x, f.name), fn, leaf)
                                         for f in dataclasses.fields(x) if f.init})
    return x
