"""Run by tests/test_multiprocess.py under ``accelerate launch --num_processes 2 --cpu``: a few Parrot iterations,
recording what each process saw, so the test can compare the processes and the global selection."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from train.config import load_config
from train.parrot import Trainer, lora_parameters

output, *overrides = sys.argv[1:]
output = Path(output)
trainer = Trainer(load_config("configs/quickstart.yaml", [f"output_dir={output / 'run'}", *overrides]))
rank = trainer.rank
die_at = int(os.environ.get("PARROT_TEST_DIE_AT", -1))  # this rank exits abruptly at that iteration

recorded = {}
select_global = trainer.select_global


def recording_select_global(prompt, local_rewards):
    if trainer.iteration == die_at and rank == 1:
        os._exit(3)
    selection = select_global(prompt, local_rewards)
    recorded[f"{trainer.iteration}/local_rewards"] = local_rewards
    recorded[f"{trainer.iteration}/rewards"] = selection.rewards
    recorded[f"{trainer.iteration}/selected"] = selection.selected.to(torch.uint8)
    recorded[f"{trainer.iteration}/local_selected"] = selection.local_selected.to(torch.uint8)
    json.dump({"prompt": prompt}, open(output / f"prompt_{trainer.iteration}.json", "w"))
    return selection


trainer.select_global = recording_select_global
trainer.train_loop()
weights = {f"unet/{k}": v for k, v in lora_parameters(trainer.pipe.unet).items()}
if trainer.expander is not None:
    weights |= {f"expander/{k}": v for k, v in lora_parameters(trainer.expander).items()}
save_file({k: v.detach().contiguous() for k, v in weights.items()}, output / f"weights_rank{rank}.safetensors")
save_file({k: v.contiguous() for k, v in recorded.items()}, output / f"recorded_rank{rank}.safetensors")
