"""ComfyUI entry point: clone this repository into ComfyUI/custom_nodes/, install requirements.txt, restart.

The nodes import the ``parrot_pipeline`` package of this same checkout, which is put first on ``sys.path``: nodes
and library then always come from one commit (nothing to reinstall after ``git pull``), and requirements.txt only
lists the third-party packages, which is what ComfyUI-Manager and the Comfy Registry install.
"""

import os
import sys

_checkout = os.path.dirname(os.path.abspath(__file__))
if _checkout not in sys.path:
    sys.path.insert(0, _checkout)

# ComfyUI imports this folder as a package. pytest, collecting the checkout, imports this file as a lone module
# when the folder's name is no Python identifier (e.g. "parrot-pipeline"); there is nothing to register then.
if __package__:
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
