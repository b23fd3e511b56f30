"""User rewards for tests, named as ``tests.reward_probes:<function>`` in configs and on command lines.

Their state lives here, in one module object that both the reward lookup (``importlib``) and the tests
(``import tests.reward_probes``) reach; a test module itself may be imported under another name by pytest."""

import threading

import torch

expansion_calls: list[int] = []  # batch sizes seen by `expansion_length`
interrupt_at_call: int | None = None
scoring_threads: list[str] = []


def expansion_length(images, prompts, metadata):
    """A weight-free reward that reads the metadata: the length of each image's expanded prompt; raises
    KeyboardInterrupt at call number ``interrupt_at_call``."""
    expansion_calls.append(len(images))
    if len(expansion_calls) == interrupt_at_call:
        raise KeyboardInterrupt
    return torch.tensor([float(len(text)) for text in metadata["expanded_prompts"]])


def thread_recording_mean(images, prompts, metadata):
    """The mean pixel value, recording the thread that computed it."""
    scoring_threads.append(threading.current_thread().name)
    return images.mean(dim=(1, 2, 3))
