"""What torch.compile's tracer (dynamo) makes of a module: its graph breaks."""

import torch
import torch._dynamo
from torch._dynamo.utils import counters


def graph_breaks(module: torch.nn.Module, *inputs: torch.Tensor) -> list[str]:
    """First lines of the reasons of every graph break when `module(*inputs)` is compiled (eager backend: traced,
    not code-generated). Counted by dynamo's counters, which include breaks in nested calls."""
    torch._dynamo.reset()
    counters.clear()
    torch.compile(module, backend="eager")(*inputs)
    return [reason.splitlines()[0] for reason, n in counters["graph_break"].items() for _ in range(n)]
