"""Device-placement checks that run on the CPU.

:class:`StrictDevices` is a dispatch mode that fails any operator whose tensor inputs live on
different devices (the error CUDA raises as "Input type ... and weight type ... should be the
same"). On the CPU, torch itself does not complain when a CPU tensor meets a ``meta`` module,
so a model on ``meta`` under this mode stands in for a model on a GPU: a CPU tensor that reaches
it fails here, in CI, as it would on a CUDA machine.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Operators that move data between devices on purpose.
_TRANSFERS = {"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize",
              "aten::to", "aten::lift_fresh", "aten::set_"}


class DeviceMixError(RuntimeError):
    pass


class StrictDevices(TorchDispatchMode):
    """Raise :class:`DeviceMixError` when an operator gets tensors of two devices (0-d CPU scalars
    excepted, as on CUDA)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name not in _TRANSFERS:
            devices = {t.device for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise DeviceMixError(f"{func._schema.name} got tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)
