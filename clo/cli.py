"""The ``clo`` command: prepare, train, eval, compare, generate (also ``python -m clo ...``).
The loss benchmarks are files of a source checkout: ``python benchmarks/bench_loss.py``.

Options come from a YAML file (``--config``) and are overridden by the command line; every
TrainConfig field is a flag (``max_steps`` -> ``--max-steps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from . import options
from .errors import UserError

COMPARE_EVAL_OPTIONS = ("max_new_tokens", "limit")  # the EvalConfig options `clo compare` takes


def _train_config():
    from .train import TrainConfig  # imported when the parser is built: its fields are the flags

    return TrainConfig


def _prepare_config():
    from .prepare import PrepareConfig

    return PrepareConfig


def _generate_config():
    from .generate import GenerateConfig

    return GenerateConfig


def _eval_config():
    from .evaluate import EvalConfig

    return EvalConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train with the CLO loss (default: embedded model and demo data)",
                             description="Train an instruct model with Cross-Lingual Optimization. With no "
                                         "--model/--data: the embedded model on the bundled en/de demo quads.")
    p_train.add_argument("--config", help="YAML file of options; command-line flags override it")
    options.add_args(p_train, _train_config())

    p_prep = sub.add_parser("prepare", help="English SFT data -> translated quads (JSONL)",
                            description="Build CLO quads: English SFT rows (oasst1 recipe, a local file or a hub "
                                        "dataset) translated by an M2M100/NLLB model, cached and resumable.")
    options.add_args(p_prep, _prepare_config())

    p_eval = sub.add_parser("eval", help="language fidelity of a model, optionally before/after",
                            description="Greedy answers to held-out target-language and English prompts, "
                                        "classified by py3langid; held-out NLL; a before/after comparison.")
    options.add_args(p_eval, _eval_config())

    p_cmp = sub.add_parser("compare", help="CLO vs SFT at equal data, and CLO at half the data (the paper's "
                                           "comparison): three runs, one table",
                           description="Train clo, sft and clo on half the quads with the same options, then score "
                                       "the base model and all three on the held-out rows. Output: "
                                       "<output-dir>/{clo,sft,clo-half}/ and compare.{json,md,png} "
                                       "(default --output-dir runs/compare).")
    p_cmp.add_argument("--config", help="YAML file of training options; command-line flags override it")
    options.add_args(p_cmp, _train_config())
    options.add_args(p_cmp, _eval_config(), only=COMPARE_EVAL_OPTIONS, help_prefix="evaluation: ")

    p_gen = sub.add_parser("generate", help="a model's answers to your prompts (base and trained side by side)",
                           description="Answer prompts with a trained model (greedy by default), optionally next "
                                       "to the model it started from.")
    options.add_args(p_gen, _generate_config())

    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _user_errors(args.command, _run, args)


def _user_errors(command: str, fn, *args) -> int:
    """fn(*args), with a UserError shown as argparse shows a bad flag: one line on stderr,
    exit code 2. Any other exception is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except UserError as err:
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"clo {command}: error: {message}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks, unless something goes wrong
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {f'[rank {rank}] ' if rank else ''}%(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "train":
        from .train import TrainConfig, fail_on_every_rank, train

        try:
            cfg = options.from_args(TrainConfig, args, config=args.config)
        except UserError as err:  # this node's --config: under torchrun the other ranks must hear of it
            fail_on_every_rank(err, device=getattr(args, "device", "auto"))
        summary = train(cfg)
        if rank == 0:
            print(json.dumps(summary, indent=2))
    elif args.command == "prepare":
        from .prepare import PrepareConfig, prepare

        prepare(options.from_args(PrepareConfig, args))
    elif args.command == "compare":
        from .compare import run_compare
        from .evaluate import EvalConfig
        from .train import TrainConfig

        ecfg = EvalConfig(**{k: getattr(args, k) for k in COMPARE_EVAL_OPTIONS if hasattr(args, k)})
        ecfg.check()
        cfg = options.from_args(TrainConfig, args, config=args.config)
        if cfg.output_dir == TrainConfig.output_dir:  # not chosen: not the folder `clo train` uses
            cfg = dataclasses.replace(cfg, output_dir="runs/compare")
        run_compare(cfg, max_new_tokens=ecfg.max_new_tokens, limit=ecfg.limit)
    elif args.command == "generate":
        from .generate import GenerateConfig, run_generate

        cfg = options.from_args(GenerateConfig, args)
        cfg.check()
        models = [("model", _trained_model(cfg))]
        if cfg.baseline or cfg.baseline_model:
            models.insert(0, ("baseline", cfg.baseline_model or _run_base_model(cfg)))
        run_generate(cfg.prompts, models=models, max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling,
                     seed=cfg.seed, device=cfg.device)
    elif args.command == "eval":
        from .evaluate import EvalConfig, run_eval

        cfg = options.from_args(EvalConfig, args)
        cfg.check()
        model = _trained_model(cfg)
        baseline = cfg.baseline if cfg.baseline is not None else _run_base_model(cfg)
        baseline = None if baseline in ("none", "") else baseline
        run_eval(model=model, baseline=baseline, data=cfg.data, target_lang=cfg.target_lang,
                 out_dir=Path(cfg.output_dir) / "eval", max_new_tokens=cfg.max_new_tokens,
                 batch_size=cfg.batch_size, limit=cfg.limit, device=cfg.device,
                 run_dir=Path(cfg.output_dir) if cfg.model is None else None, include_trained=cfg.include_trained)
    return 0


def _trained_model(args) -> str:
    """--model, else <output-dir>/final."""
    if args.model is not None:
        return args.model
    final = Path(args.output_dir) / "final"
    if not final.exists():
        raise UserError(f"no --model and no trained model in {final}; run `clo train` first")
    return str(final)


def _run_base_model(args) -> str:
    """The model the run started from: the run of --model when that is a run's final/, else the run
    in --output-dir; the embedded default if it names none."""
    from .checkpoints import run_of
    from .model import DEFAULT_MODEL

    run = run_of(args.model) or Path(args.output_dir)
    run_cfg = run / "config.json"
    baseline = json.loads(run_cfg.read_text()).get("model") if run_cfg.exists() else None
    return baseline or DEFAULT_MODEL


if __name__ == "__main__":
    raise SystemExit(main())
