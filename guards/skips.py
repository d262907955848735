"""The skip connections of a diffusers ``UNet2DConditionModel``: what a ControlNet-style branch adds to.

SafePatch sizes its zero convolutions from them; the exporter sizes the denoise graph's residual inputs."""

from __future__ import annotations

Dim = int | str
"""A static size, or a symbolic one: "h", "w", or a UNet level "h/2", "w/4"."""


def residual_shapes(unet_config, h: Dim, w: Dim) -> tuple[list[tuple[int, Dim, Dim]], tuple[int, Dim, Dim]]:
    """(C, h_i, w_i) of each down-block residual of a ``UNet2DConditionModel`` (conv_in, each resnet of each
    down block, each downsampler), and of the mid-block residual: the shapes a diffusers ControlNet adds."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)

    def level(dim: Dim, i: int) -> Dim:
        if i == 0:
            return dim
        return dim // 2 ** i if isinstance(dim, int) else f"{dim}/{2 ** i}"

    down = [(channels[0], h, w)]
    for i, ch in enumerate(channels):
        down += [(ch, level(h, i), level(w, i))] * layers[i]
        if i < len(channels) - 1:
            down.append((ch, level(h, i + 1), level(w, i + 1)))
    last = len(channels) - 1
    return down, (channels[-1], level(h, last), level(w, last))
