"""Drop-ins for TRL's reference-free preference trainers (trl.experimental): no logits.

    from clo_kernels.integrations.trl_experimental import FusedCPOTrainer as CPOTrainer     # CPO, SimPO, AlphaPO
    from clo_kernels.integrations.trl_experimental import FusedORPOTrainer as ORPOTrainer   # ORPO

Each takes its TRL trainer's arguments (plus keyword-only ``impl`` and ``options`` of the fused
loss) and keeps its data pipeline, collator, logging and evaluation; only the batch's loss and
metrics (``get_batch_loss_metrics``) change. The chosen and rejected rows go through the model's
backbone together, as in TRL, and the final hidden states and the lm_head weight into
``fused_linear_sequence_loss``; the [tokens x vocab] logits are never built.

- CPO: ``CPOObjective`` from CPOConfig's loss_type (sigmoid, hinge, ipo, simpo), beta,
  label_smoothing, simpo_gamma, cpo_alpha and AlphaPO's alpha; the NLL of the chosen responses.
- ORPO: ``ORPOObjective``, whose NLL TRL takes over the chosen rows' prompt and response tokens
  while the log odds use the responses' mean log-probs. Both come from one pass: each chosen
  row's prompt tokens are a sequence of their own (outside every pair, inside the NLL), labels
  shifted here (shift=False) so that the first response token stays predicted by the prompt's
  last position.

Logged under TRL's names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected},
nll_loss (CPO: 0 when cpo_alpha is 0, as TRL logs it), ORPO's log_odds_ratio and
log_odds_chosen, and logits/{chosen,rejected}: the mean logit over the positions TRL averages
(every position of the padded rows; ORPO: all but the last), one product with the head's mean row.

Refused by name when the trainer is built, as FusedDPOTrainer refuses them (hf.model_problems):
vision-language models, encoder-decoder models, heads the fused loss cannot reproduce,
Mixture-of-Experts router losses, prompt-learning peft; and settings the objective refuses.
"""

from __future__ import annotations

import inspect

import torch

try:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
except ImportError as err:
    raise ImportError(f"clo_kernels.integrations.trl_experimental needs TRL's experimental trainers ({err}): "
                      "pip install 'clo-kernels[trl]'") from err

from .. import _inputs
from ..loss import fused_linear_sequence_loss
from ..objective import CPOObjective, ORPOObjective, orpo_log_odds
from ..options import LogProbOptions
from . import hf


def cpo_objective(args: CPOConfig, **tensors) -> CPOObjective:
    """CPOConfig's loss settings as the objective. TRL ignores label_smoothing for hinge and ipo
    (with a warning), and so does the objective there."""
    smoothing = 0.0 if args.loss_type in ("hinge", "ipo") else args.label_smoothing
    return CPOObjective(loss_type=args.loss_type, beta=args.beta, label_smoothing=smoothing,
                        simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha, alpha=args.alpha, **tensors)


def mean_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, softcap) -> torch.Tensor:
    """(...,) fp32: each position's mean over the vocabulary of ``hidden @ weight.T + bias``
    (softcapped), without the logits: the mean over V of a linear map is one product with the
    head's mean row, reduced in fp32 without an fp32 copy of the head. Softcapping is not linear:
    then the logits are built a block of rows at a time, without gradients (the metric's only cost)."""
    with torch.no_grad():
        h = hidden.reshape(-1, hidden.shape[-1]).float()
        if softcap is None:
            means = h @ weight.mean(0, dtype=torch.float32)
            if bias is not None:
                means += bias.mean(dtype=torch.float32)
        else:
            w, b = weight.float(), None if bias is None else bias.float()
            means = torch.cat([(softcap * torch.tanh(torch.nn.functional.linear(block, w, b) / softcap)).mean(1)
                               for block in h.split(1024)]) if h.shape[0] else h.new_zeros(0)
        return means.reshape(hidden.shape[:-1])


def _router_coef(text) -> float:
    """The router loss coefficient CPOTrainer and ORPOTrainer add: the config's, where it asks for
    router logits."""
    return getattr(text, "router_aux_loss_coef", 0.0) if getattr(text, "output_router_logits", False) else 0.0


class _FusedPairHead:
    """What both drop-ins share: the checks before TRL builds anything, the head inside the
    model's forward, and TRL's gathering of the metrics."""

    def __init__(self, model=None, args=None, *rest, impl: str = "auto", options: LogProbOptions | None = None,
                 **kwargs):
        given = inspect.signature(super().__init__).bind(model, args, *rest, **kwargs).arguments
        _inputs.check_impl(impl)
        if options is not None and not isinstance(options, LogProbOptions):
            raise TypeError(f"options must be a clo_kernels.LogProbOptions, got {type(options).__name__}")
        bad = []
        if args is not None:
            try:
                self._objective(args, chosen=torch.zeros(0, dtype=torch.long),
                                rejected=torch.zeros(0, dtype=torch.long))
            except ValueError as err:
                bad.append(f"{type(args).__name__} settings the objective refuses ({err})")
        if model is not None:
            bad += hf.model_problems(model, router_coef=_router_coef, processing_class=given.get("processing_class"),
                                     peft_config=given.get("peft_config"),
                                     init_kwargs=getattr(args, "model_init_kwargs", None),
                                     trust_remote_code=getattr(args, "trust_remote_code", False))
        if bad:
            raise ValueError(f"{type(self).__name__} does not support: " + "; ".join(bad)
                             + f". trl.experimental's {type(self).__mro__[2].__name__} has its own head for these.")
        self._impl, self._options = impl, options
        super().__init__(model, args, *rest, **kwargs)  # the TRL trainer's, next in the MRO

    def _run_head(self, model, input_ids, attention_mask, fn):
        """fn(hidden, weight, bias, softcap) inside the model's forward, on one dtype (under
        autocast, its rule)."""
        def head(hidden, weight, bias, softcap):
            return fn(*hf.one_dtype(hidden, weight, bias), softcap)

        hf.add_hidden_head(hf.base_model(self.accelerator.unwrap_model(model)))
        return model(input_ids=input_ids, attention_mask=attention_mask, head_fn=head)

    def _logged(self, metrics: dict[str, torch.Tensor], train_eval: str) -> dict[str, float]:
        """Per-process scalars, gathered and averaged: TRL's mean over every process's pairs
        (equal pairs per process, as the sampler gives them)."""
        prefix = "eval_" if train_eval == "eval" else ""
        gather = self.accelerator.gather_for_metrics
        return {prefix + k: gather(v.detach().reshape(1)).mean().item() for k, v in metrics.items()}

    def _loss_and_metrics(self, out, logits_chosen, logits_rejected, train_eval, **extra):
        metrics = {k: v for k, v in out.metrics.items() if k.startswith(("rewards/", "logps/"))}
        metrics.update({"logits/chosen": logits_chosen, "logits/rejected": logits_rejected, **extra})
        return out.loss, self._logged(metrics, train_eval)


class FusedCPOTrainer(_FusedPairHead, CPOTrainer):
    """trl.experimental.cpo.CPOTrainer with the loss from clo_kernels' fused head (module docstring)."""

    _tag_names = ["trl", "cpo", "clo-kernels"]

    @staticmethod
    def _objective(args, **tensors):
        return cpo_objective(args, **tensors)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """CPOTrainer's (loss, metrics) of a batch, from the fused head."""
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.pad_token_id,
                                       device=self.accelerator.device)
        labels = cat["concatenated_labels"]
        n = batch["chosen_labels"].shape[0]
        chosen = torch.arange(n, device=labels.device)
        objective = self._objective(self.args, chosen=chosen, rejected=chosen + n)

        def fn(hidden, weight, bias, softcap):
            out = fused_linear_sequence_loss(hidden, weight, labels, objective, bias=bias, softcap=softcap,
                                             shift=True, impl=self._impl, options=self._options)
            means = mean_logits(hidden, weight, bias, softcap)
            return out, means[:n].mean(), means[n:].mean()

        out, lc, lr = self._run_head(model, cat["concatenated_input_ids"], cat["concatenated_attention_mask"], fn)
        nll = out.metrics["nll"] if self.args.cpo_alpha != 0 else torch.zeros_like(lc)
        return self._loss_and_metrics(out, lc, lr, train_eval, nll_loss=nll)


class FusedORPOTrainer(_FusedPairHead, ORPOTrainer):
    """trl.experimental.orpo.ORPOTrainer with the loss from clo_kernels' fused head (module docstring)."""

    _tag_names = ["trl", "orpo", "clo-kernels"]

    @staticmethod
    def _objective(args, **tensors):
        return ORPOObjective(beta=args.beta, **tensors)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """ORPOTrainer's (loss, metrics) of a batch, from the fused head.

        Sequences: chosen responses 0..n-1, rejected responses n..2n-1 (the pairs), the chosen
        rows' prompt tokens 2n..3n-1 (NLL only). Labels are shifted here, per position of the
        flattened (2n * T) rows: a position belongs to the sequence of the token it predicts."""
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                       device=self.accelerator.device)
        ids, mask, response = cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat[
            "concatenated_labels"]
        n = batch["chosen_labels"].shape[0]
        rows = torch.arange(2 * n, device=ids.device)[:, None]
        every = torch.where(mask == 1, ids, -100)  # TRL's NLL labels: prompt and response of the chosen rows
        labels = torch.where(rows < n, every, response)
        labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
        in_prompt = (rows < n) & (torch.nn.functional.pad(response[:, 1:], (0, 1), value=-100) == -100)
        seq_ids = torch.where(in_prompt, rows + 2 * n, rows).expand_as(labels)
        pairs = torch.arange(n, device=ids.device)
        nll_mask = torch.ones(3 * n, dtype=torch.bool, device=ids.device)
        nll_mask[n:2 * n] = False
        objective = self._objective(self.args, chosen=pairs, rejected=pairs + n, nll_mask=nll_mask)

        def fn(hidden, weight, bias, softcap):
            out = fused_linear_sequence_loss(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                             objective, bias=bias, softcap=softcap, shift=False,
                                             seq_ids=seq_ids.reshape(-1), num_seqs=3 * n, impl=self._impl,
                                             options=self._options)
            means = mean_logits(hidden[:, :-1], weight, bias, softcap)
            return out, means[:n].mean(), means[n:].mean()

        out, lc, lr = self._run_head(model, ids, mask, fn)
        log_odds = orpo_log_odds(out.logps[:n], out.logps[n:2 * n])
        ratio = torch.nn.functional.logsigmoid(log_odds)
        return self._loss_and_metrics(out, lc, lr, train_eval, nll_loss=out.metrics["nll"],
                                      log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())
