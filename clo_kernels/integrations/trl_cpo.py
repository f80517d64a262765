"""The drop-in for TRL's CPOTrainer (trl.experimental.cpo): CPO, SimPO, AlphaPO without logits.

    from clo_kernels.integrations.trl_cpo import FusedCPOTrainer as CPOTrainer   # the one-line change

``FusedCPOTrainer`` takes CPOTrainer's arguments (plus keyword-only ``impl`` and ``options`` of the
fused loss) and keeps its data pipeline, collator, logging and evaluation; only the batch's loss
and metrics (``get_batch_loss_metrics``) change. The chosen and rejected rows go through the
model's backbone together, as in TRL, and the final hidden states and the lm_head weight into
``fused_linear_sequence_loss`` with ``CPOObjective``: CPOConfig's loss_type (sigmoid, hinge, ipo,
simpo), beta, label_smoothing, simpo_gamma, cpo_alpha and AlphaPO's alpha, in TRL's formulas and
per-micro-batch normalisation. The [tokens x vocab] logits are never built. Logged under TRL's
names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, logits/{chosen,
rejected} (the mean logit over every position of the padded rows, as TRL averages them: one
product with the head's mean row) and nll_loss (0 when cpo_alpha is 0, as TRL logs it).

Refused by name when the trainer is built: encoder-decoder models, models whose head the fused
loss cannot reproduce (hf.split_lm), Mixture-of-Experts router losses.
"""

from __future__ import annotations

import torch

try:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError as err:
    raise ImportError(f"clo_kernels.integrations.trl_cpo needs TRL's experimental CPOTrainer ({err}): "
                      "pip install 'clo-kernels[trl]'") from err

from .. import _inputs
from ..loss import fused_linear_sequence_loss
from ..objective import CPOObjective
from ..options import LogProbOptions
from . import hf


def cpo_objective(args: CPOConfig, **tensors) -> CPOObjective:
    """CPOConfig's loss settings as the objective. TRL ignores label_smoothing for hinge and ipo
    (with a warning), and so does the objective there."""
    smoothing = 0.0 if args.loss_type in ("hinge", "ipo") else args.label_smoothing
    return CPOObjective(loss_type=args.loss_type, beta=args.beta, label_smoothing=smoothing,
                        simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha, alpha=args.alpha, **tensors)


def mean_logit(hidden: torch.Tensor, weight: torch.Tensor, bias, softcap) -> torch.Tensor:
    """The mean over every position and every vocabulary entry of ``hidden @ weight.T + bias``
    (softcapped), without the logits: the mean over V of a linear map is one product with the mean
    row. Softcapping is not linear: then the logits are built a block of rows at a time, without
    gradients (the metric's only cost)."""
    with torch.no_grad():
        h = hidden.reshape(-1, hidden.shape[-1]).float()
        if softcap is None:
            mean = h @ weight.float().mean(0)
            return (mean if bias is None else mean + bias.float().mean()).mean()
        total = h.new_zeros(())
        for block in h.split(1024):
            z = torch.nn.functional.linear(block, weight.float(), None if bias is None else bias.float())
            total += (softcap * torch.tanh(z / softcap)).mean(1).sum()
        return total / max(h.shape[0], 1)


class FusedCPOTrainer(CPOTrainer):
    """trl.experimental.cpo.CPOTrainer with the loss from clo_kernels' fused head (module docstring)."""

    _tag_names = ["trl", "cpo", "clo-kernels"]

    def __init__(self, model=None, args: CPOConfig | None = None, *rest, impl: str = "auto",
                 options: LogProbOptions | None = None, **kwargs):
        _inputs.check_impl(impl)
        if options is not None and not isinstance(options, LogProbOptions):
            raise TypeError(f"options must be a clo_kernels.LogProbOptions, got {type(options).__name__}")
        bad = []
        if args is not None:
            try:
                cpo_objective(args, chosen=torch.zeros(0, dtype=torch.long), rejected=torch.zeros(0, dtype=torch.long))
            except ValueError as err:
                bad.append(f"loss_type={args.loss_type!r} with these options ({err})")
        if model is not None and not isinstance(model, str):
            if model.config.is_encoder_decoder:
                bad.append("an encoder-decoder model")
            else:
                try:
                    hf.split_lm(model)
                except ValueError as err:
                    bad.append(str(err))
            if getattr(model.config, "output_router_logits", False) and getattr(model.config,
                                                                                "router_aux_loss_coef", 0.0):
                bad.append("a Mixture-of-Experts router loss (output_router_logits with router_aux_loss_coef)")
        if bad:
            raise ValueError(f"{type(self).__name__} does not support: " + "; ".join(bad)
                             + ". trl.experimental.cpo.CPOTrainer has its own head for these.")
        self._impl, self._options = impl, options
        super().__init__(model, args, *rest, **kwargs)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """CPOTrainer's (loss, metrics) of a batch, from the fused head."""
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.pad_token_id,
                                       device=self.accelerator.device)
        labels = cat["concatenated_labels"]
        n = batch["chosen_labels"].shape[0]
        chosen = torch.arange(n, device=labels.device)
        objective = cpo_objective(self.args, chosen=chosen, rejected=chosen + n)

        def head(hidden, weight, bias, softcap):
            if not torch.is_autocast_enabled(hidden.device.type):  # the kernels take one dtype
                hidden, bias = hidden.to(weight.dtype), None if bias is None else bias.to(weight.dtype)
            out = fused_linear_sequence_loss(hidden, weight, labels, objective, bias=bias, softcap=softcap,
                                             shift=True, impl=self._impl, options=self._options)
            return out, mean_logit(hidden[:n], weight, bias, softcap), mean_logit(hidden[n:], weight, bias, softcap)

        hf.add_hidden_head(hf.base_model(self.accelerator.unwrap_model(model)))
        out, logits_chosen, logits_rejected = model(input_ids=cat["concatenated_input_ids"],
                                                    attention_mask=cat["concatenated_attention_mask"], head_fn=head)
        # The objective's metrics are this process's means over its pairs: gathered and averaged,
        # TRL's mean over every process's pairs (equal pairs per process, as the sampler gives them).
        metrics = {k: v for k, v in out.metrics.items() if k.startswith(("rewards/", "logps/"))}
        metrics["logits/chosen"], metrics["logits/rejected"] = logits_chosen, logits_rejected
        metrics["nll_loss"] = out.metrics["nll"] if self.args.cpo_alpha != 0 else torch.zeros_like(logits_chosen)
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        return out.loss, {prefix + k: gather(v.reshape(1)).mean().item() for k, v in metrics.items()}
