"""ComfyUI nodes for Parrot: thin adapters over parrot_pipeline (see the README's ComfyUI section)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
