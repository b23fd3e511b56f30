"""Run by tests/test_rpo.py under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo): a short RPO run that
saves each process's final LoRA, so the test can compare the processes."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from train.config import load_config
from train.parrot import lora_parameters
from train.rpo import RPOConfig, RPOTrainer

output, *overrides = sys.argv[1:]
output = Path(output)
trainer = RPOTrainer(load_config("configs/rpo_quickstart.yaml", [f"output_dir={output / 'run'}", *overrides], RPOConfig))
trainer.run()
weights = {name: value.detach().contiguous() for name, value in lora_parameters(trainer.pipe.unet).items()}
save_file(weights, output / f"weights_rank{trainer.rank}.safetensors")
