"""FLOP counting with torch's FlopCounterMode, with the backward of grouped convolutions counted correctly.

torch 2.14's formula for `aten.convolution_backward` counts a grouped convolution's gradients as if the convolution
were dense: `groups` times too many FLOPs (a depthwise 3×3 conv of 256 channels: 256×). MiT's Mix-FFN and the DAFormer
head's ASPP are depthwise, so the uncorrected count of an HRDA iteration is several times too high. Here both
gradients cost what the forward costs, 2 × N × (output positions; input positions for a transposed conv) × the
weight's elements, each when its output is asked for.
"""
from __future__ import annotations

import contextlib
from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    "FLOPs (2 per multiply-add) of one convolution: every weight element meets every (output, or input if transposed) position."
    positions = prod(x_shape[2:]) if transposed else prod(out_shape[2:])
    return 2 * x_shape[0] * positions * prod(w_shape)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None) -> int:
    "The input gradient and the weight gradient each cost one forward of the same convolution."
    return sum(output_mask[:2]) * conv_flops(x_shape, w_shape, grad_out_shape, transposed)


def flop_counter() -> FlopCounterMode:
    "A FlopCounterMode (no table printed) whose grouped-convolution backward is counted correctly."
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: conv_backward_flops})


@contextlib.contextmanager
def autocast_off_on_meta():
    "Let code that opens `torch.autocast(...)` run on the meta device (where autocast has no dtype): no autocast there."
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)
    torch.autocast = autocast
    try: yield
    finally: torch.autocast = real
