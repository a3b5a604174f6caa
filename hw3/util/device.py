"""The device choice, where fp16 autocast applies, and the model hub's offline switch."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional


from hw3.util.errors import UserError


def resolve_device(name: Optional[str] = None):
    """The torch device for a --device option: None or "auto" = cuda if available, else cpu."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("--device %r is not a torch device (cpu, cuda, cuda:0...)" % name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device %s asked for, but torch sees no CUDA GPU here" % name)
    return device


def autocast(device, enabled: bool = True):
    """fp16 autocast where it applies, on CUDA when enabled (the 2080 Ti has no bf16); no context otherwise: torch 1.12
    warns at every torch.autocast("cuda") on a machine without CUDA, even a disabled one."""
    import torch

    if enabled and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def hub_offline(offline: Optional[bool] = None) -> bool:
    """Whether model-hub downloads are off (HF_HUB_OFFLINE); `offline` sets it, also in an already imported hub, so a
    missing weight file fails at once instead of waiting on a network that is not there."""
    if offline is not None:
        os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
            constants.HF_HUB_OFFLINE = offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
