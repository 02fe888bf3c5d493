"""Initialisation by name, so that where and how a model was built does not change its initial values.

Every module's own tensors are drawn at full size on the CPU from a generator seeded by the run's seed
and the module's qualified name, by the first rule that knows the module, and then written into the
tensors through a :class:`ShardWriter`: whole, or this rank's shard of a sharded parameter. So the values
depend on neither the construction order nor the device: a model built on the meta device and initialised
on its shards (FSDP2), or partitioned as it was built (ZeRO-3), starts from the same weights as one built
whole. A module that no rule knows is an error, so nothing keeps an accidental value.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from itertools import chain

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]  # one module's own parameters and buffers, by attribute name
Rule = Callable[[nn.Module, Tensors, torch.Generator], bool]  # fills the tensors in place; False: not its module


class ShardWriter:
    """Whole tensors: the shape is the tensor's, and the value is copied in. Sharding backends subclass it."""

    def shape(self, tensor: torch.Tensor) -> torch.Size:
        return tensor.shape

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        tensor.copy_(value)


def generator_for(seed: int, name: str) -> torch.Generator:
    """The generator of the module ``name``: the same for the same seed and name, wherever it runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def torch_default(module: nn.Module, tensors: Tensors, generator: torch.Generator) -> bool:
    """PyTorch's own initialisation of linear, convolution and normalisation layers, from ``generator``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        weight = tensors["weight"]
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if "bias" in tensors:
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(tensors["bias"], -bound, bound, generator=generator)
        return True
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
        for name, tensor in tensors.items():
            tensor.fill_(1 if name in ("weight", "running_var") else 0)
        return True
    return False


@torch.no_grad()
def initialise(
    root: nn.Module, seed: int, rules: Sequence[Rule], writer: ShardWriter | None = None, prefix: str = ""
) -> None:
    """Draw every tensor under ``root`` by the first of ``rules`` (then :func:`torch_default`) that knows its
    module, the module named ``prefix + name`` for the seed; a module no rule knows raises ``TypeError``."""
    writer = writer or ShardWriter()
    for name, module in root.named_modules():
        own = dict(chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)))
        if not own:
            continue
        values = {key: torch.empty(writer.shape(tensor), dtype=tensor.dtype) for key, tensor in own.items()}
        generator = generator_for(seed, prefix + name)
        if not any(rule(module, values, generator) for rule in (*rules, torch_default)):
            raise TypeError(f"no initialisation rule for {prefix + name} ({type(module).__name__})")
        for key, tensor in own.items():
            writer.write(tensor, values[key])


def initialise_from_torch_seed(module: nn.Module, rules: Sequence[Rule]) -> None:
    """A constructor's last step: :func:`initialise` from a seed drawn from torch's global generator, so that
    ``torch.manual_seed`` decides the values as for any torch module. Nothing is drawn where there is nothing
    to draw into: on the meta device, or under ZeRO-3's ``zero.Init`` (parameters partitioned, empty here);
    their builder initialises them on the shards."""
    if any(t.is_meta for t in chain(module.parameters(), module.buffers())):
        return
    if any(p.numel() == 0 for p in module.parameters()):
        return
    initialise(module, int(torch.randint(2**31, (), device="cpu")), rules)
