"""``clo generate``: a model's answers to prompts you type, next to the model it started from.

    clo generate "Wie backe ich Brot?" --baseline          # <output-dir>/final and the run's base model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .evaluate import detect_language, generate_responses, loops, one_at_a_time
from .model import DEFAULT_MODEL
from .options import RUN_DIR, device_option, option


@dataclass
class GenerateConfig:
    """Every `clo generate` option, declared once (clo/options.py)."""

    prompts: list[str] | None = option(None, "one or more prompts, each one user turn", positional=True)
    model: str | None = option(None, "model to answer (default: <output-dir>/final)")
    baseline: bool = option(False, "also answer with the model the run started from (the run of --model, else of "
                            "--output-dir)")
    baseline_model: str | None = option(None, "also answer with this model (implies --baseline)")
    output_dir: str = option(RUN_DIR, "the training run (for the defaults above)")
    max_new_tokens: int = option(128, "new tokens per answer")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.7, "with --sample")
    top_p: float = option(0.9, "with --sample")
    seed: int = option(0, "with --sample")
    device: str = device_option()

    def check(self) -> None:
        if self.max_new_tokens < 1 or (self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1)):
            raise UserError("--max-new-tokens must be >= 1; with --sample, --temperature > 0 and 0 < --top-p <= 1")

    @property
    def sampling(self) -> dict | None:
        return {"temperature": self.temperature, "top_p": self.top_p} if self.sample else None


def run_generate(prompts: list[str], *, models: list[tuple[str, str | None]], max_new_tokens: int,
                 sampling: dict | None = None, seed: int = 0, device: str | None = None) -> dict:
    """``clo generate``: each model's answer to each prompt, printed side by side with the
    answer's language (and "loops" where it goes round). ``models``: (label, spec) pairs, spec
    None = the embedded default; loaded one at a time. Returns {label: [answers]}."""
    def answer(lm, tokenizer):
        torch.manual_seed(seed)
        return generate_responses(lm, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=8,
                                  progress=False, sampling=sampling)

    texts = one_at_a_time(models, answer, device=device, dtype=torch.float32)
    answers = {label: t for (label, _), t in zip(models, texts, strict=True)}
    names = {label: spec or DEFAULT_MODEL for label, spec in models}
    for i, prompt in enumerate(prompts):
        print(f"\n> {prompt}")
        for label, texts in answers.items():
            lang, _ = detect_language(texts[i].replace(prompt.strip(), " "))
            flag = ", loops" if loops(texts[i]) else ""
            print(f"\n[{label}: {names[label]}] ({lang}{flag})\n{texts[i]}")
    return answers
