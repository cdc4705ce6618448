"""Train B-LoRA: train one image (or a few) into content and style blocks, in the graph, on the host's patcher.

The node holds what every run needs; the rest comes from optional settings nodes (``train_settings``). A workflow
saved before the split (every setting on this node) still runs: in API format its old inputs arrive here and are
used when their settings node is not wired (``legacy_settings``)."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..blora.errors import BLoRAError
from ..blora.formats.files import read_adapter
from ..blora.host.output_files import register_output_loras
from ..blora.host.train import train_blora
from ..blora.host.train_previews import PreviewSampler, live_sender, save_rows
from ..blora.host.train_seeds import train_blora_seeds
from ..blora.train.loss_history import loss_map
from ..blora.train.recipe import ALGORITHMS, BLOCK_PRESETS, SEED_DRAWS, TRAINING_DTYPES, TrainConfig
from .dataset import TrainingSetType
from .folders import adapter_path
from .train_settings import GROUPS, NO_RESUME, ValidationType
from .types import BLoRA

log = logging.getLogger(__name__)
MAIN_SETTINGS = ("blocks", "layer_filter", "rank", "alpha", "algorithm", "learning_rate", "steps", "resolution",
                 "seed", "seeds", "seed_draws", "training_dtype")
NO_PREVIEW = torch.zeros(1, 64, 64, 3)  # the IMAGE output when no validation is wired


def _inputs() -> list:
    d = TrainConfig()
    return [
        io.Model.Input("model", tooltip="SDXL or FLUX.1 (dev or schnell) model to train on; it is never modified (the "
                                        "output is a clone). Other architectures are refused with an error naming the "
                                        "model."),
        io.Vae.Input("vae", tooltip="VAE that encodes the training images (once, before the first step)."),
        io.Image.Input("images", optional=True,
                       tooltip="Training image(s). One image is the B-LoRA default; several are allowed. Not needed "
                               "with a training_set."),
        io.Conditioning.Input("positive", optional=True,
                              tooltip="Prompt, e.g. 'A [v]' with a rare token: one conditioning for all images, or "
                                      "one per image. Not needed with a training_set."),
        TrainingSetType.Input("training_set", optional=True,
                              tooltip="Images with a caption each (Load B-LoRA Training Folder, B-LoRA Training "
                                      "Set), used instead of images and positive. Mixed sizes are bucketed."),
        io.Combo.Input("blocks", options=list(BLOCK_PRESETS), default=d.blocks,
                       tooltip="Blocks that get adapters. SDXL: q/k/v/out of both attentions of content "
                               "output_blocks.0.1, style output_blocks.1.1, layout input_blocks.8.1. FLUX.1: linear1 "
                               "and linear2 of the single blocks of SplitFlux's split: content single_blocks.0-9, "
                               "style single_blocks.10-37 (no layout role). custom: those layer_filter selects."),
        io.String.Input("layer_filter", default=d.layer_filter,
                        tooltip="Regex over module paths such as output_blocks.1.1.transformer_blocks.0.attn2.to_k "
                                "(FLUX.1: single_blocks.12.linear1, double_blocks.3.img_attn.qkv). With custom it "
                                "selects the Linear layers (any block by name, e.g. ^double_blocks\\.3\\.(img|txt)_"
                                "(attn|mlp)); otherwise it narrows the preset."),
        io.Int.Input("rank", default=d.rank, min=1, max=1024, tooltip="LoRA rank (the paper: 64)."),
        io.Float.Input("alpha", default=d.alpha, min=0.01, max=4096.0, step=0.5,
                       tooltip="LoRA alpha; scale alpha/rank (alpha/sqrt(rank) with rslora). The paper: alpha = rank."),
        io.Combo.Input("algorithm", options=list(ALGORITHMS), default=d.algorithm,
                       tooltip="LoRA; DoRA (adds a magnitude per input column; saved as a (1, in) dora_scale that "
                               "stock ComfyUI renders exactly); LoKr and LoHa (LyCORIS: smaller files, often "
                               "recommended for style); AdaLoRA (SVD-form adapters whose rank moves to the layers "
                               "that need it; saved as plain LoRA with a rank per layer). Their options: B-LoRA "
                               "Algorithm Options."),
        io.Float.Input("learning_rate", default=d.learning_rate, min=1e-7, max=1.0, step=1e-6, round=False,
                       tooltip="Constant learning rate (the paper: 5e-5)."),
        io.Int.Input("steps", default=d.steps, min=1, max=100000, tooltip="Optimizer steps (the paper: 1000)."),
        io.Int.Input("resolution", default=d.resolution, min=64, max=4096, step=8,
                     tooltip="Short side of the training images in pixels (aspect kept, no crop)."),
        io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                     tooltip="Seed of the adapter initialisation, timesteps and noise: same seed, same weights."),
        io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default=d.training_dtype,
                       tooltip="Compute dtype of the forward and backward (adapter weights stay float32)."),
        io.String.Input("filename_prefix", default="blora/blora",
                        tooltip="Name of the file written to output/loras/ (a counter is added; subfolders allowed)."),
        # optional, as before the split: API workflows saved before seeds existed still validate
        io.Int.Input("seeds", default=d.seeds, min=1, max=16, optional=True,
                     tooltip="Train this many B-LoRAs at once, initialised from seed, seed+1, …, in one batched "
                             "forward and backward (plain LoRA; no resume). Each is saved as <prefix>_seed<S>; the "
                             "outputs carry the first. Some seeds separate content and style better than others: "
                             "with B-LoRA Validation wired, each seed gets its own preview row."),
        io.Combo.Input("seed_draws", options=list(SEED_DRAWS), default=d.seed_draws, optional=True,
                       tooltip="With seeds > 1: shared: every seed trains on the timesteps and noise of `seed` (the "
                               "layers below the first trained block then run once for all seeds: faster). own: "
                               "seed+n draws its own, exactly as a run with that seed alone."),
        *[g.type.Input(key, optional=True, tooltip=f"{g.display_name}: {g.description}") for key, g in GROUPS.items()],
        ValidationType.Input("validation", optional=True,
                             tooltip="B-LoRA Validation: preview rows (content only, style only, both; one per seed) "
                                     "at step 0, every N steps and at the end."),
    ]


def old_inputs(prompt: dict | None, node_id: str | None) -> dict:
    """Literal inputs of this node in the queued prompt that its schema no longer has (the host passes only the
    inputs a node declares, so they are read from the prompt itself)."""
    node = (prompt or {}).get(str(node_id), {}) if node_id is not None else {}
    declared = {i.id for i in _inputs()} | {"filename_prefix"}
    return {k: v for k, v in (node.get("inputs") or {}).items() if k not in declared and not isinstance(v, list)}


def legacy_settings(wired: dict[str, dict | None], old: dict) -> dict:
    """Settings from a workflow saved before the split, whose inputs named here arrive on this node: each is used
    when its settings node is not wired; with the node wired, a different value is an error saying what moved."""
    values = {}
    unknown = []
    for name, value in old.items():
        key = next((k for k, g in GROUPS.items() if name in g.names()), None)
        if key is None:
            unknown.append(name)
            continue
        if name == "gradient_checkpointing" and isinstance(value, bool):  # the old switch
            value = "trained blocks" if value else "off"
        group = wired.get(key)
        if group is None:
            values[name] = value
        elif group.get(name) != value:
            raise BLoRAError(f"`{name}` moved from Train B-LoRA to the {GROUPS[key].display_name} node wired into "
                             f"`{key}`; this workflow sets it on both ({value!r} and {group.get(name)!r}): remove "
                             f"it from Train B-LoRA's inputs")
    if unknown:  # ignored, as the host ignores inputs a node does not declare
        log.warning("Train B-LoRA: ignoring inputs it does not have: %s", ", ".join(sorted(unknown)))
    if values:
        where = sorted({GROUPS[k].display_name for k, g in GROUPS.items() if set(values) & set(g.names())})
        log.warning("Train B-LoRA: this workflow was saved before settings moved to their own nodes; %s are read "
                    "from the old inputs (now on %s)", ", ".join(sorted(values)), ", ".join(where))
    return values


class BLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_output_loras()  # trained files (output/loras) are listed for resume_from and stock LoraLoader
        return io.Schema(
            node_id="BLoRATrain", display_name="Train B-LoRA", category="B-LoRA/train",
            description="Train a B-LoRA from one image (or a training set of captioned images): LoRA adapters on the "
                        "attention layers of the content and style blocks (the paper's recipe by default; on FLUX.1 "
                        "the single blocks of SplitFlux's split, trained on the flow-matching objective), saved "
                        "to output/loras/ in the kohya format. Returns the model with the trained B-LoRA applied, "
                        "and the B-LoRA. More settings: B-LoRA Algorithm Options, Augmentation, Checkpoints, "
                        "Memory Options, Validation.",
            inputs=_inputs(),
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The input model with the trained B-LoRA at "
                                                                   "strength 1."),
                     BLoRA.Output(display_name="BLORA", tooltip="The trained B-LoRA (for Apply B-LoRA and the "
                                                                "other B-LoRA nodes)."),
                     io.Custom("LOSS_MAP").Output(display_name="loss_map",
                                                  tooltip="The loss of every step, for the host's Plot Loss "
                                                          "Graph (also kept in the file's metadata)."),
                     io.Image.Output(display_name="previews",
                                     tooltip="The last validation row of each seed (content only, style only, "
                                             "both), top to bottom; a black 64x64 image without validation.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True)

    @classmethod
    def execute(cls, model, vae, filename_prefix: str, images=None, positive=None, training_set=None,
                validation=None, **inputs) -> io.NodeOutput:
        wired = {key: inputs.pop(key, None) for key in GROUPS}
        main = {name: inputs.pop(name) for name in MAIN_SETTINGS if name in inputs}
        old = {**old_inputs(cls.hidden.prompt, cls.hidden.unique_id), **inputs}
        settings = {**main, **legacy_settings(wired, old)}
        for group in wired.values():
            settings.update(group or {})
        resume_from = settings.pop("resume_from", NO_RESUME)
        config = TrainConfig(**settings)
        if training_set is not None:
            images, positive = training_set.images, training_set.conditioning
        if images is None or positive is None:
            raise BLoRAError("connect a training_set, or images and positive")
        resume = None if resume_from in (None, "", NO_RESUME) else read_adapter(adapter_path(resume_from))
        node_id = cls.hidden.unique_id
        seeds = [config.seed + n for n in range(config.seeds)]
        previews = None if validation is None else PreviewSampler(validation, vae, seeds, live_sender(node_id))
        if config.seeds > 1:
            if resume is not None:
                raise BLoRAError("resume_from works with seeds = 1: resume one seed's file on its own")
            outs = train_blora_seeds(model, vae, images, positive, config, filename_prefix=filename_prefix,
                                     node_id=node_id, on_step=previews)
            ui = {"seed_losses": [o.losses for o in outs], "seeds": seeds, "files": [o.path for o in outs]}
        else:
            outs = [train_blora(model, vae, images, positive, config, filename_prefix=filename_prefix, resume=resume,
                                node_id=node_id, on_step=previews)]
            ui = {"ranks": [outs[0].ranks]} if config.algorithm == "AdaLoRA" else {}
        first = outs[0]
        ui.update({"loss": first.losses, "elapsed": [first.elapsed]})
        grid = NO_PREVIEW
        if previews is not None:
            ui["previews"] = save_rows(previews.rows, dict(zip(seeds, (o.path for o in outs))))
            ui["preview_seconds"] = [previews.seconds]
            grid = previews.final_grid()
            log.info("B-LoRA validation previews: %d rows in %.1fs", len(previews.rows), previews.seconds)
        return io.NodeOutput(first.model, first.adapter, loss_map(first.losses), grid, ui=ui)


NODES = [BLoRATrain]
