"""ComfyUI integration suite (needs COMFYUI_PATH)."""
