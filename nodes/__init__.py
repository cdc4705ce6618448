"""ComfyUI node classes (V3). Each topic module exports ``NODES``; this module gathers them."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import apply, batch_apply, dataset, fusion, load, schedule, tools, train, train_settings
from .folders import register_blora_folder

NODES: list[type[io.ComfyNode]] = [*load.NODES, *apply.NODES, *train.NODES, *train_settings.NODES, *dataset.NODES,
                                   *tools.NODES, *fusion.NODES, *schedule.NODES, *batch_apply.NODES]


class BLoRAExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_blora_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
