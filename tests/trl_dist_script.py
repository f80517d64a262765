"""Run under torchrun by tests/test_trl.py: trl.DPOTrainer, FusedDPOTrainer and CLOTrainer on 2
gloo ranks, under DDP or DeepSpeed ZeRO-3 (argv[2]), the same model, data and arguments for each
(1 row per rank per micro-batch, 2 micro-batches accumulated per step); under ZeRO-3 also TRL's
experimental CPOTrainer and ORPOTrainer and their drop-ins, and trl.DPOTrainer and FusedDPOTrainer
save their models (gathered from the partitions) beside argv[1], where rank 0 writes the runs'
logs as JSON."""

import copy
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch.distributed
from test_trl import clo_args, demo_quads, dpo_args, preference_rows, tiny_llama
from trainer_fixtures import smollm2_tokenizer
from trl import DPOTrainer

from clo.trl_trainer import CLOTrainer
from clo_kernels.integrations.trl import FusedDPOTrainer

# ZeRO-3 with nothing kept whole: every parameter, lm_head's too, is a partition outside the
# forward of its module ("auto": the Trainer fills in its own batch size, accumulation, clipping).
# save_model gathers the whole weights (a 16-bit name, but an fp32 run's are saved as they are).
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto", "gradient_clipping": "auto"}
SAVED = (DPOTrainer, FusedDPOTrainer)  # under ZeRO-3, into argv[1]'s folder / saved / the class's name


def count_micro_batches(trainer) -> list:
    """A list that grows by one per micro-batch the trainer runs."""
    seen, step = [], trainer.training_step

    def training_step(*args, **kwargs):
        seen.append(1)
        return step(*args, **kwargs)

    trainer.training_step = training_step
    return seen


def main(path: str, mode: str) -> None:
    tok = smollm2_tokenizer()
    extra = {"deepspeed": ZERO3} if mode == "zero3" else {}
    runs = [(DPOTrainer, dpo_args, preference_rows), (FusedDPOTrainer, dpo_args, preference_rows),
            (CLOTrainer, clo_args, demo_quads)]
    if mode == "zero3":  # the experimental drop-ins feed the same head (no reference model)
        from test_trl_experimental import trainer_args
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        from clo_kernels.integrations.trl_experimental import FusedCPOTrainer, FusedORPOTrainer

        for config, classes in ((CPOConfig, (CPOTrainer, FusedCPOTrainer)),
                                (ORPOConfig, (ORPOTrainer, FusedORPOTrainer))):
            runs += [(cls, functools.partial(trainer_args, config), preference_rows) for cls in classes]
    logs = {}
    saved = Path(path).parent / "saved" if mode == "zero3" else None
    for cls, args, data in runs:
        model = tiny_llama(len(tok), seed=1).train()
        ref = {"ref_model": copy.deepcopy(model)} if issubclass(cls, DPOTrainer) else {}
        trainer = cls(model=model, train_dataset=data(), processing_class=tok, **ref,
                      args=args(Path(tempfile.mkdtemp()), per_device_train_batch_size=1,
                                gradient_accumulation_steps=2, **extra))
        micro = count_micro_batches(trainer)
        trainer.train()
        if saved is not None and cls in SAVED:
            trainer.save_model(str(saved / cls.__name__))  # every rank: the gather is a collective
        logs[cls.__name__] = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        logs[cls.__name__ + ".setup"] = [trainer.accelerator.num_processes, trainer.accelerator.distributed_type.value,
                                         len(micro) / trainer.state.global_step]
        print(f"rank {trainer.accelerator.process_index}: {cls.__name__} trained", file=sys.stderr, flush=True)
    if trainer.accelerator.is_main_process:
        Path(path).write_text(json.dumps(logs))
    # Neither accelerate nor the Trainer destroys the group, and a process that exits with a live
    # gloo group can abort in interpreter teardown (SIGABRT, "terminate called without an active
    # exception"), as clo.distributed.teardown found. CI once lost rank 1 of the DDP run that way
    # after the last trainer's data was prepared; the lines on stderr say which phase ended.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    print(f"rank {trainer.accelerator.process_index}: group destroyed", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
