"""CLO on TRL's machinery: ``CLOTrainer`` with ``CLOConfig`` (DPOConfig plus nll_weight).

    from clo.trl_trainer import CLOConfig, CLOTrainer

For people who train with TRL (accelerate, DeepSpeed, their loggers). The dataset holds quads in
the ``clo`` data format (prompt_en, response_en, prompt_tgt, response_tgt; rows whose "split" is
not "train" never train); each quad becomes the four sequences of ``clo.data`` in the CLO order,
with both pair kinds and the NLL on the target-language chosen response. The head, the reference
and the logging are clo_kernels.integrations.trl.FusedDPOTrainer's; this module adds what the app
owns: the quads, their chat-template encoding and the bad-row policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

# DPOConfig (trl's) comes through clo_kernels.integrations.trl: without TRL, its import says what to install
from clo_kernels import LAYOUTS, CLOObjective, LogProbOptions, quad_pairs
from clo_kernels.integrations.trl import DPOConfig, FusedDPOTrainer, bind_dpo_arguments

from . import data

log = logging.getLogger(__name__)


@dataclass
class CLOConfig(DPOConfig):
    """DPOConfig plus the CLO loss's own settings; beta is the pair terms' beta."""

    nll_weight: float = field(default=0.5, metadata={"help": "lambda: weight of the target-language NLL; the two "
                                                             "pair kinds get 1 - lambda"})
    unlikelihood: float = field(default=0.0, metadata={"help": "weight of token-level unlikelihood on the chosen "
                                                                 "responses (clo train's --unlikelihood; 0: the "
                                                                 "paper's loss)"})
    on_bad_row: str = field(default="error", metadata={"help": "a bad quad: 'error' stops naming it, 'skip' drops "
                                                               "it and counts it in the log"})


@dataclass
class QuadCollator:
    """Quads (tokenised by CLOTrainer) to the four CLO sequences each: input_ids, labels (prompts
    at -100), attention_mask (4Q, T) right-padded, and ref_logps (4Q,) where precomputed."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        quads = [data.Encoded(e["quad_id"], tuple(map(tuple, e["input_ids"])), tuple(map(tuple, e["labels"])))
                 for e in examples]
        batch = data.collate(quads, pad_id=self.pad_token_id)
        out = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
        if "ref_logps" in examples[0]:
            out["ref_logps"] = torch.tensor([x for e in examples for x in e["ref_logps"]], dtype=torch.float32)
        return out


class CLOTrainer(FusedDPOTrainer):
    """CLO on TRL: ``CLOTrainer(model, args=CLOConfig(...), train_dataset=quads, processing_class=tok)``.

    loss = nll_weight * NLL(y_tgt | x_tgt) + (1 - nll_weight) * DPO over (x_en: y_en > y_tgt) and
    (x_tgt: y_tgt > y_en), one micro-batch of Q quads = 4Q sequences; the reference precomputed
    (precompute_ref_log_probs) or on the fly, as in FusedDPOTrainer."""

    _FIXED = {**FusedDPOTrainer._FIXED, "loss_type": ["sigmoid"], "f_divergence_type": "reverse_kl",
              "label_smoothing": 0.0, "use_weighting": False, "ld_alpha": None}
    _tag_names = ["trl", "clo", "clo-kernels"]

    def __init__(self, model, *args, impl: str = "auto", options: LogProbOptions | None = None, **kwargs):
        given = bind_dpo_arguments(model, *args, **kwargs)
        if given["args"] is None:
            given["args"] = CLOConfig(output_dir="trainer_output")
        elif not isinstance(given["args"], CLOConfig):
            raise TypeError(f"CLOTrainer needs args=CLOConfig(...), got {type(given['args']).__name__}")
        # beta and nll_weight checked as the loss checks them, with its messages, before TRL builds
        # anything (FusedDPOTrainer would report them as options it does not support)
        none = torch.zeros(0, dtype=torch.long)
        self._objective(given["args"], chosen=none, rejected=none)
        tok = given["processing_class"]
        if tok is None:
            raise ValueError("CLOTrainer needs processing_class (the tokenizer whose chat template encodes the quads)")
        if given["data_collator"] is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            given["data_collator"] = QuadCollator(pad)
        super().__init__(impl=impl, options=options, **given)

    def _config_problems(self, args) -> list[str]:
        bad = super()._config_problems(args)
        if args.loss_weights is not None:
            bad.append(f"loss_weights={args.loss_weights} (CLOConfig weighs the terms with nll_weight)")
        return bad

    @staticmethod
    def _objective(args, *, chosen, rejected, nll_mask=None, ref_logps=None):
        """The CLO loss: sigmoid DPO over both pair kinds plus nll_weight times the target NLL."""
        return CLOObjective(chosen=chosen, rejected=rejected, nll_mask=nll_mask if args.nll_weight > 0 else None,
                            ref_logps=ref_logps, beta=args.beta, nll_weight=args.nll_weight)

    @staticmethod
    def _labels(inputs) -> torch.Tensor:
        return inputs["labels"]

    def _layout(self, num_seqs: int, device):
        chosen, rejected, nll_mask = quad_pairs(num_seqs // len(LAYOUTS["clo"].sequences), device=device)
        return chosen, rejected, nll_mask if self.args.nll_weight > 0 else None

    def _unlikelihood_mask(self, num_seqs: int, device) -> torch.Tensor:
        layout = LAYOUTS["clo"]
        return layout.mask(layout.positives, num_seqs // len(layout.sequences), device)

    @staticmethod
    def _stored_reference(inputs) -> torch.Tensor:
        return inputs["ref_logps"].float()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Quads to their four tokenised sequences (clo.data's chat-template encoding); bad rows
        raise or are dropped and counted (args.on_bad_row)."""
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(f"CLOTrainer: the {dataset_name} dataset must be a datasets.Dataset of quads, "
                            f"got {type(dataset).__name__}")
        if "quad_id" in dataset.column_names:  # prepared already (evaluate() prepares again)
            return dataset
        source = f"{dataset_name} dataset"
        quads, report = data.quads_from_rows(dataset, source=source, on_bad_row=args.on_bad_row,
                                             split="train" if dataset_name == "train" else None)
        encoded, enc = data.encode_quads(processing_class, quads, max_length=args.max_length or 2**31,
                                         on_bad_row=args.on_bad_row, source=source)
        report.dropped.update(enc.dropped)
        report.examples += enc.examples
        report.truncated, report.kept = enc.truncated, enc.kept
        (log.warning if report.dropped or report.truncated else log.info)("CLOTrainer: %s", report.summary())
        if not encoded:
            raise ValueError(f"CLOTrainer: no quads left to train on: {report.summary()}")
        return Dataset.from_dict({"quad_id": [e.id for e in encoded],
                                  "input_ids": [[list(s) for s in e.input_ids] for e in encoded],
                                  "labels": [[list(s) for s in e.labels] for e in encoded]})

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["quad_id", "input_ids", "labels", "ref_logps"]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """A "ref_logps" column, (4,) per quad in the CLO order."""
        from accelerate.utils import tqdm
        from torch.utils.data import DataLoader

        if "ref_logps" in dataset.column_names:
            return dataset
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        model, rows = self.ref_model or self.model, []
        for batch in tqdm(loader, desc=f"reference log-probs ({name})"):
            logps = self._precomputed_reference_logps(model, batch).view(-1, len(LAYOUTS["clo"].sequences))
            rows.append(self.accelerator.gather_for_metrics(logps).cpu())
        return dataset.add_column("ref_logps", torch.cat(rows).tolist())

    def compute_ref_log_probs(self, model, inputs):
        """(4Q,) reference log-probs of a collated batch of quads."""
        return self._precomputed_reference_logps(model, inputs)
