"""Run by tests/test_multiprocess.py under ``accelerate launch --num_processes 2 --cpu``: a few Parrot iterations,
recording what each process saw, so the test can compare the processes and the global selection."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import train.parrot
from train.config import load_config
from train.parrot import Trainer, lora_parameters

output, *overrides = sys.argv[1:]
output = Path(output)
if os.environ["RANK"] == "1":
    # Rank 1 computes differently, as GPUs can: a process that ran the supervised stage or sampled the expansion
    # itself would then train on other weights or another text.
    supervised_finetune = train.parrot.supervised_finetune

    def perturbed_finetune(model, *args, **kwargs):
        losses = supervised_finetune(model, *args, **kwargs)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)
        return losses

    generate_expansions = train.parrot.generate_expansions
    train.parrot.supervised_finetune = perturbed_finetune
    train.parrot.generate_expansions = lambda *args, seed, **kwargs: generate_expansions(*args, seed=seed + 1, **kwargs)
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
    recorded[f"{trainer.iteration}/front"] = selection.front.to(torch.uint8)
    recorded[f"{trainer.iteration}/local_selected"] = selection.selected[rank].to(torch.uint8)
    recorded[f"{trainer.iteration}/weights"] = selection.weights
    json.dump({"prompt": prompt}, open(output / f"prompt_{trainer.iteration}.json", "w"))
    return selection


sample_and_score = trainer.sample_and_score


def recording_sample_and_score(prompt, texts):
    with open(output / f"texts_rank{rank}.jsonl", "a") as file:
        file.write(json.dumps(texts) + "\n")
    return sample_and_score(prompt, texts)


trainer.select_global = recording_select_global
trainer.sample_and_score = recording_sample_and_score
trainer.train_loop()
weights = {f"unet/{k}": v for k, v in lora_parameters(trainer.pipe.unet).items()}
if trainer.expander is not None:  # its LoRA, and the weights of its supervised stage
    weights |= {f"expander/{k}": v for k, v in trainer.expander.named_parameters()}
save_file({k: v.detach().contiguous() for k, v in weights.items()}, output / f"weights_rank{rank}.safetensors")
save_file({k: v.contiguous() for k, v in recorded.items()}, output / f"recorded_rank{rank}.safetensors")
json.dump({"validations": trainer.validation.records, "selected": trainer.selected_iteration,
           "learning_rates": {name: o.param_groups[0]["lr"] for name, o in trainer.optimizers.items()}},
          open(output / f"validation_rank{rank}.json", "w"))  # fmt: skip
