"""A real ComfyUI server on loopback, started from the checkout at $COMFYUI_PATH, and the HTTP calls the tests make."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class ComfyServer:
    """``python main.py --cpu`` with every folder (models, custom_nodes, output, user) under ``base``."""

    def __init__(self, comfyui_path: Path, base: Path, env: dict[str, str]):
        self.base = base
        self.log_path = base / "comfyui.log"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
            "--disable-auto-launch",
        ]  # fmt: skip
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=comfyui_path, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        self._wait_until_up(timeout=300)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, route: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, data: dict):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{route}",
            data=json.dumps(data).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt, wait for it and return its history entry (``status``, ``outputs``)."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise ValueError(f"ComfyUI refused the prompt ({status}): {json.dumps(answer, indent=1)}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # an entry is written when the prompt has finished, with or without error
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_text()[-4000:]}")

    def run_ok(self, prompt: dict, timeout: float = 600) -> dict:
        entry = self.run(prompt, timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {execution_error(entry)}\n{self.log_text()[-4000:]}")
        return entry


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry."""
    for event, data in entry["status"]["messages"]:
        if event == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return None
