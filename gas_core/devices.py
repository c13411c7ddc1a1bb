"""Which torch device a setting names, with one set of rules for the search client's
``--device`` and the latency service's ``GAS_DEVICE``."""

from __future__ import annotations

import torch


def resolve_device(spec: str, local_rank: int = 0, world: int = 1, name: str = "--device") -> torch.device:
    """``auto|cpu|cuda|cuda:N`` → a device; raises ValueError with a one-line reason that names the
    setting (``name``: the flag, or the service's ``GAS_DEVICE``). ``auto`` is CUDA when torch sees
    it; plain ``cuda`` is ``cuda:LOCAL_RANK`` (each torchrun rank its own GPU)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {spec}: no CUDA device is visible to torch {torch.__version__}")
        if spec == "cuda":
            index = local_rank
        else:
            if world > 1:
                raise ValueError(f"{name} {spec}: under torchrun each rank takes cuda:LOCAL_RANK; use cuda")
            try:
                index = int(spec[5:])
            except ValueError:
                raise ValueError(f"{name} {spec}: expected cuda:N with N a GPU index") from None
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"{name} {spec}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    raise ValueError(f"{name} {spec!r}: expected auto, cpu, cuda or cuda:N")
