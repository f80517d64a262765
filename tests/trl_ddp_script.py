"""Run under torchrun by tests/test_trl.py: trl.DPOTrainer and FusedDPOTrainer on 2 gloo ranks,
the same model, data and arguments; rank 0 writes both runs' logs as JSON to argv[1]."""

import copy
import json
import sys
import tempfile

from test_trl import dpo_args, preference_rows, tiny_llama
from trainer_fixtures import smollm2_tokenizer
from trl import DPOTrainer

from clo_kernels.integrations.trl import FusedDPOTrainer


def main(path: str) -> None:
    from pathlib import Path

    tok = smollm2_tokenizer()
    logs = {}
    for cls in (DPOTrainer, FusedDPOTrainer):
        model = tiny_llama(len(tok), seed=1).train()
        trainer = cls(model=model, ref_model=copy.deepcopy(model), train_dataset=preference_rows(),
                      processing_class=tok, args=dpo_args(Path(tempfile.mkdtemp()), per_device_train_batch_size=1))
        trainer.train()
        logs[cls.__name__] = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        if trainer.accelerator.is_main_process:
            logs[cls.__name__ + ".world"] = trainer.accelerator.num_processes
    if logs.get("DPOTrainer.world"):
        Path(path).write_text(json.dumps(logs))


if __name__ == "__main__":
    main(sys.argv[1])
