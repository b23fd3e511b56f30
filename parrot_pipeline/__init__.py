"""parrot-pipeline: Parrot's prompt expansion and original-prompt-centred guidance for diffusers."""

from .bundle import ParrotConfig, push_bundle_to_hub, read_bundle, save_bundle
from .expansion import ExpanderConfig
from .guidance import parrot_guidance
from .pipeline_parrot import ParrotPipeline, ParrotPipelineOutput

__version__ = "0.1.0"

__all__ = [
    "ExpanderConfig",
    "ParrotConfig",
    "ParrotPipeline",
    "ParrotPipelineOutput",
    "parrot_guidance",
    "push_bundle_to_hub",
    "read_bundle",
    "save_bundle",
]
