"""Tests of the inference library and the ComfyUI nodes: they need no train extra, and CI runs them under
transformers 4.57 too."""
