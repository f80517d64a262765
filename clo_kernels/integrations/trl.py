"""The TRL drop-in on the fused loss: DPO without logits.

    from clo_kernels.integrations.trl import FusedDPOTrainer as DPOTrainer   # the one-line change

``FusedDPOTrainer`` takes ``trl.DPOTrainer``'s arguments (plus keyword-only ``impl`` and
``options`` of the fused loss). The policy's sequence log-probs and the loss come from
``fused_linear_sequence_loss`` on the final hidden states and the lm_head weight, computed inside
the model's forward (hf.add_hidden_head), so the DDP, FSDP2 and peft wrappers stay around the loss,
and the head itself runs as lm_head's forward (hf.call_as_forward), so FSDP2 gathers a head wrapped
as its own unit and ZeRO-3 fetches its partitions (tests/test_trl.py: one process, DDP, DeepSpeed
ZeRO-3 and LoRA; tests/test_sharded_head.py: the head under FSDP2; accelerate runs FSDP on GPUs
only, so FSDP2 through the Trainer is untested); the
reference log-probs come from ``sequence_logps``: precomputed (precompute_ref_log_probs) or on
the fly from the reference model, or from the peft model with its adapters disabled, as TRL
does. The [tokens x vocab] logits are never built. The loss is DPOConfig's, as an objective
(clo_kernels.objective.PreferenceObjective): every loss_type of TRL 1.16 with loss_weights,
label_smoothing, discopop_tau and f_divergence_type, TRL's formulas and normalisation per
micro-batch; aot and aot_unpaired rank the batch's pairs, so they take the exact two-pass path.
use_weighting (WPO) reads each token's log sum p^2, a row statistic of the same pass over the
logits (options.ROW_STATS); ld_alpha (LD-DPO) weighs the tokens past each pair's shared length
(objective.ld_token_weights) in the policy's and the reference's sums. Refused by name when the
trainer is built, never replaced by a different loss: sync_ref_model, and ld_alpha
together with sft or use_weighting (TRL computes those from the unweighted log-probs). Logged
under TRL's names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected},
entropy, logits/{chosen,rejected}, mean_token_accuracy (from the row statistics: no logits
kept), num_tokens, and nll where there is an NLL term. padding_free=True (which TRL 1.16 turns
off for DPO) packs each padded batch into one row of its real tokens with restarting position
ids before the model runs: no padding token goes through the model or the head.

CLO itself on TRL (the ``clo`` app's quads, their encoding and bad-row policy) is
``clo.trl_trainer.CLOTrainer``, a subclass of this trainer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch

try:
    from accelerate.utils import is_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as err:
    raise ImportError(f"clo_kernels.integrations.trl needs TRL ({err}): pip install 'clo-kernels[trl]'") from err

from .. import _inputs
from ..loss import fused_linear_sequence_loss, sequence_logps
from ..objective import PreferenceObjective, ld_token_weights
from ..options import LogProbOptions
from . import hf

# DPOConfig settings that change the loss, with the one value FusedDPOTrainer implements.
_FIXED = {"sync_ref_model": False, "use_liger_kernel": False}
# The row statistics behind TRL's logged entropy, logits/* and mean_token_accuracy.
_LOGGED_STATS = ("entropy", "mean_logits", "is_top1")


def _preference_objective(args, **tensors) -> PreferenceObjective:
    """DPOConfig's loss settings as the objective (ValueError, naming the option, where it refuses them)."""
    return PreferenceObjective(loss_type=tuple(args.loss_type), loss_weights=args.loss_weights, beta=args.beta,
                               label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
                               f_divergence_type=args.f_divergence_type,
                               f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                               use_weighting=args.use_weighting, **tensors)


def _model_problems(model, args, processing_class, peft_config) -> list[str]:
    """What about the model rules the fused loss out, checked before TRL builds anything."""
    def router_coef(text) -> float:  # DPOTrainer adds the router loss of a model that has one
        coef = getattr(text, "router_aux_loss_coef", 0.0) if args.router_aux_loss_coef is None \
            else args.router_aux_loss_coef
        return coef if hasattr(text, "output_router_logits") else 0.0

    return hf.model_problems(model, router_coef=router_coef, processing_class=processing_class,
                             peft_config=peft_config, init_kwargs=args.model_init_kwargs,
                             trust_remote_code=args.trust_remote_code)


def bind_dpo_arguments(*args, **kwargs) -> dict:
    """trl.DPOTrainer's arguments by name, defaults filled in, however they were passed (for
    subclasses that read or fill some of them before FusedDPOTrainer.__init__)."""
    bound = inspect.signature(DPOTrainer.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in list(bound.arguments.items())[1:]}


class FusedDPOTrainer(DPOTrainer):
    """trl.DPOTrainer with the loss from clo_kernels' fused head (module docstring: what maps to what)."""

    _FIXED = _FIXED
    _tag_names = ["trl", "dpo", "clo-kernels"]

    def __init__(self, model, *args, impl: str = "auto", options: LogProbOptions | None = None, **kwargs):
        given = bind_dpo_arguments(model, *args, **kwargs)
        cfg = given["args"] or DPOConfig(output_dir="trainer_output")
        _inputs.check_impl(impl)
        # DPOConfig has no unlikelihood weight; a subclass's config may add one (on the sequences
        # of _unlikelihood_mask).
        unlikelihood = getattr(cfg, "unlikelihood", 0.0)
        _inputs.check_unlikelihood(unlikelihood)
        if options is not None and not isinstance(options, LogProbOptions):
            raise TypeError(f"options must be a clo_kernels.LogProbOptions, got {type(options).__name__}")
        bad = self._config_problems(cfg)
        bad += _model_problems(model, cfg, given["processing_class"], given["peft_config"])
        if bad:
            raise ValueError(f"{type(self).__name__} does not support: " + "; ".join(bad)
                             + ". trl.DPOTrainer has its own head for these.")
        self._impl, self._options, self._unlikelihood = impl, options, unlikelihood
        self._packed = bool(cfg.padding_free)
        if self._packed:  # TRL pads as it always does (and would warn that it does); the head packs
            given["args"] = cfg = copy.copy(cfg)
            cfg.padding_free = False
        super().__init__(**given)

    # ------------------------------------------------------------------------------------------
    # What a subclass changes (CLO: clo.trl_trainer): the options, the sequences' layout and the
    # reference's place

    def _config_problems(self, args) -> list[str]:
        bad = [f"{k}={getattr(args, k)!r} (supported: {v!r})" for k, v in self._FIXED.items() if getattr(args, k) != v]
        if args.ld_alpha is not None and ("sft" in args.loss_type or args.use_weighting):
            bad.append(f"ld_alpha={args.ld_alpha} with {'sft' if 'sft' in args.loss_type else 'use_weighting'} "
                       "(TRL computes that term from the unweighted log-probs)")
        try:
            self._objective(args, chosen=torch.zeros(0, dtype=torch.long), rejected=torch.zeros(0, dtype=torch.long))
        except ValueError as err:
            bad.append(f"loss_type={list(args.loss_type)} with these options ({err})")
        return bad

    @staticmethod
    def _objective(args, *, chosen, rejected, nll_mask=None, ref_logps=None):
        """The loss of a micro-batch: TRL's menu, from DPOConfig's settings."""
        return _preference_objective(args, chosen=chosen, rejected=rejected, ref_logps=ref_logps)

    @staticmethod
    def _labels(inputs) -> torch.Tensor:
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)

    def _layout(self, num_seqs: int, device):
        """chosen, rejected, nll_mask: TRL's batches are [chosen rows, rejected rows] ("sft" is the
        NLL of the chosen rows, which PreferenceObjective knows)."""
        half = torch.arange(num_seqs // 2, device=device)
        return half, half + num_seqs // 2, None

    def _unlikelihood_mask(self, num_seqs: int, device) -> torch.Tensor | None:
        """The sequences the unlikelihood term covers (CLO: the chosen responses)."""
        return None

    @staticmethod
    def _stored_reference(inputs) -> torch.Tensor:
        return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()

    # ------------------------------------------------------------------------------------------
    # The head: everything goes through the model's (patched) forward

    def _head(self, model, inputs, labels, fn, token_weights=None):
        """fn(hidden, weight, bias, softcap, labels, token_weights, layout) inside the model's forward,
        on one dtype (under autocast, its rule). layout: seq_ids and num_seqs for the fused functions.
        Padded: hidden (S, T, D) as the batch is. Packed (padding_free): the batch's real tokens in one
        row with position ids restarting per sequence (transformers then keeps each sequence's
        attention to itself), hidden (N, D) with labels and token weights packed alike."""
        hf.add_hidden_head(hf.base_model(self.accelerator.unwrap_model(model)))
        if not self._packed:
            def padded(hidden, weight, bias, softcap):
                return fn(*hf.one_dtype(hidden, weight, bias), softcap, labels, token_weights, {})

            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], head_fn=padded)
        real = inputs["attention_mask"].bool()
        S = real.shape[0]
        layout = {"seq_ids": torch.arange(S, device=real.device).repeat_interleave(real.sum(1)), "num_seqs": S}

        def packed(hidden, weight, bias, softcap):
            return fn(*hf.one_dtype(hidden[0], weight, bias), softcap, labels[real],
                      None if token_weights is None else token_weights[real], layout)

        positions = (real.cumsum(1) - 1)[real][None]
        return model(input_ids=inputs["input_ids"][real][None], position_ids=positions, head_fn=packed)

    def _token_weights(self, labels) -> torch.Tensor | None:
        """LD-DPO's weights of the tokens past each pair's shared length (ld_alpha), else None."""
        if getattr(self.args, "ld_alpha", None) is None:
            return None
        chosen, rejected, _ = self._layout(labels.shape[0], labels.device)
        return ld_token_weights(labels, chosen, rejected, alpha=self.args.ld_alpha, shift=True)

    def _sequence_logps(self, model, inputs) -> torch.Tensor:
        labels = self._labels(inputs)
        return self._head(model, inputs, labels, lambda hidden, weight, bias, softcap, y, w, layout: sequence_logps(
            hidden, weight, y, bias=bias, softcap=softcap, shift=True, token_weights=w, impl=self._impl,
            options=self._options, **layout), token_weights=self._token_weights(labels))

    @torch.no_grad()
    def _reference_logps(self, model, inputs) -> torch.Tensor:
        """(S,) sequence log-probs of the reference: ``model`` (the reference model, or the policy
        before training), or the peft policy with its adapters off (TRL's frozen "ref" adapter
        where it made one). In the training step's context, as TRL computes it on the fly: an
        extra autocast region here would round differently from the policy's forward, and a
        policy equal to its reference would not get margins of exactly 0."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            return self._sequence_logps(model, inputs)

    def _precomputed_reference_logps(self, model, inputs) -> torch.Tensor:
        """(S,) reference log-probs for precompute_ref_log_probs, outside any training step: under
        the accelerator's autocast, as TRL's compute_ref_log_probs."""
        with self.accelerator.autocast():
            return self._reference_logps(model, inputs)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's hook for precompute_ref_log_probs: (chosen, rejected) reference log-probs."""
        return self._precomputed_reference_logps(model, inputs).chunk(2)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches precomputed reference log-probs under (data, model); a different key keeps a
        # cache that TRL's own head wrote from being read as this head's, and the reverse.
        key = self._precompute_model_hash
        self._precompute_model_hash = f"{key}/clo-kernels"
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = key

    # ------------------------------------------------------------------------------------------
    # The loss of one micro-batch

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels = self._labels(inputs)
        chosen, rejected, nll_mask = self._layout(labels.shape[0], labels.device)
        if self.precompute_ref_logps:
            ref = self._stored_reference(inputs)
        else:
            ref = self._reference_logps(self.ref_model or self.model, inputs)

        objective = self._objective(self.args, chosen=chosen, rejected=rejected, nll_mask=nll_mask,
                                    ref_logps=ref.to(labels.device))

        ul_mask = self._unlikelihood_mask(labels.shape[0], labels.device)

        def fn(hidden, weight, bias, softcap, y, w, layout):
            return fused_linear_sequence_loss(
                hidden, weight, y, objective, bias=bias, softcap=softcap, shift=True,
                unlikelihood=self._unlikelihood, unlikelihood_mask=ul_mask, row_stats=_LOGGED_STATS,
                token_weights=w, impl=self._impl, options=self._options, **layout)

        out = self._head(model, inputs, labels, fn, token_weights=self._token_weights(labels))
        loss = out.loss
        has_nll = nll_mask is not None or "sft" in self.args.loss_type
        self._log_metrics(mode, inputs, out, ref.to(out.logps.device), chosen, rejected, nll=has_nll,
                          counts=(labels[:, 1:] != -100).sum(1).float())
        if return_outputs:  # TRL's deprecated path for compute_metrics: it also recomputes the logits
            with torch.no_grad():
                return loss, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return loss

    def _log_metrics(self, mode, inputs, out, ref, chosen, rejected, *, nll: bool, counts):
        """TRL DPOTrainer's metrics, gathered over processes the way it gathers them; counts: (S,)
        labelled tokens per sequence."""
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        stats, total = out.row_stats, self.accelerator.gather_for_metrics
        in_c = torch.zeros_like(counts, dtype=torch.bool).index_fill_(0, chosen, True)
        in_r = torch.zeros_like(counts, dtype=torch.bool).index_fill_(0, rejected, True)
        # Token-weighted means over every process's tokens, 0 without tokens (as TRL logs them).
        for name, values, mask in (("entropy", stats["entropy"], None), ("logits/chosen", stats["mean_logits"], in_c),
                                   ("logits/rejected", stats["mean_logits"], in_r),
                                   ("mean_token_accuracy", stats["is_top1"], in_c)):
            part = torch.stack([values.sum(), counts.sum()]) if mask is None else \
                torch.stack([values[mask].sum(), counts[mask].sum()])
            num, den = total(part.reshape(1, 2)).sum(0).tolist()
            metrics[name].append(num / den if den > 0 else 0.0)
        logps = out.logps
        c_rewards, r_rewards = self.beta * (logps[chosen] - ref[chosen]), self.beta * (logps[rejected] - ref[rejected])
        for name, value in (("rewards/chosen", c_rewards), ("rewards/rejected", r_rewards),
                            ("rewards/accuracies", (c_rewards > r_rewards).float()),
                            ("rewards/margins", c_rewards - r_rewards),
                            ("logps/chosen", logps[chosen]), ("logps/rejected", logps[rejected])):
            metrics[name].append(gather(value).mean().item())
        for name in ("nll",) * nll + ("unlikelihood",) * ("unlikelihood" in out.metrics):
            metrics[name].append(gather(out.metrics[name].reshape(1)).mean().item())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
