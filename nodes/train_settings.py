"""Settings nodes of Train B-LoRA: what not every run needs, wired into its optional inputs (as the host's sampler
and guider nodes compose). Each node outputs a dict of TrainConfig fields; B-LoRA Validation outputs the preview
settings with its prompts encoded."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..blora.host.output_files import register_output_loras
from ..blora.host.train_previews import Validation
from ..blora.train.previews import ValidationSettings
from ..blora.adapters.kinds.lora import INITIALISATIONS
from ..blora.train.recipe import CHECKPOINTING, OPTIMIZERS, SAVE_PRECISIONS, TrainConfig
from .folders import adapter_files

NO_RESUME = "none"
CATEGORY = "B-LoRA/train"


def _algorithm_inputs(d: TrainConfig) -> list:
    return [
        io.Boolean.Input("rslora", default=d.rslora,
                         tooltip="Rank-stabilised scale alpha/sqrt(rank); the file stores alpha*sqrt(rank)."),
        io.Combo.Input("init", options=list(INITIALISATIONS), default=d.init,
                       tooltip="How a fresh run draws the down matrices (up starts at zero): gaussian, std 1/rank, "
                               "as the original B-LoRA training (diffusers, PEFT init 'gaussian'); kaiming_uniform, "
                               "uniform in +-1/sqrt(in features), PEFT's default."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=d.optimizer,
                       tooltip="AdamW (betas 0.9/0.999, eps 1e-8, the paper's) or plain SGD."),
        io.Float.Input("weight_decay", default=d.weight_decay, min=0.0, max=1.0, step=1e-5, round=False,
                       tooltip="Weight decay of the adapter parameters (the paper: 1e-4)."),
        io.Float.Input("loraplus_ratio", default=d.loraplus_ratio, min=0.01, max=64.0, step=0.5,
                       tooltip="LoRA+: the up matrices learn this many times faster (1 = off; the LoRA+ paper "
                               "suggests 16)."),
        io.Boolean.Input("dora_wd", default=d.dora_wd,
                         tooltip="LoKr/LoHa only: add DoRA's magnitude on top (LyCORIS dora_wd), on the input axis: "
                                 "a (1, in) dora_scale that stock ComfyUI renders exactly (LyCORIS: wd_on_out=False)."),
        io.Int.Input("lokr_factor", default=d.lokr_factor, min=-1, max=1024,
                     tooltip="LoKr: how each dimension is split for the Kronecker product (LyCORIS factor). -1 = "
                             "most balanced split (e.g. 1280 -> 32 x 40); a small factor (4, 8) gives a small "
                             "first factor and more trainable weights in the second."),
        io.Boolean.Input("lokr_decompose_both", default=d.lokr_decompose_both,
                         tooltip="LoKr: factor the small Kronecker matrix (w1) at rank too, not only w2 (fewer "
                                 "weights; LyCORIS decompose_both)."),
        io.Boolean.Input("lokr_full_matrix", default=d.lokr_full_matrix,
                         tooltip="LoKr: keep both Kronecker factors full (no rank; alpha is ignored). LyCORIS also "
                                 "switches to a full w2 on its own when rank is at least half its size."),
        io.Int.Input("adalora_target_rank", default=d.adalora_target_rank, min=0, max=1024,
                     tooltip="AdaLoRA: the average rank per layer at the end (rank is the initial rank; 0 = half of "
                             "it); the total budget goes to the layers whose triplets score as most important."),
        io.Float.Input("adalora_warmup", default=d.adalora_warmup, min=0.0, max=0.99, step=0.05,
                       tooltip="AdaLoRA: fraction of the steps trained at the initial rank before pruning starts."),
        io.Float.Input("adalora_final", default=d.adalora_final, min=0.0, max=0.99, step=0.05,
                       tooltip="AdaLoRA: fraction of the steps (at the end) trained at the target budget, the "
                               "rank pattern fixed."),
        io.Int.Input("adalora_interval", default=d.adalora_interval, min=1, max=10000,
                     tooltip="AdaLoRA: steps between two reallocations of the budget while it falls."),
        io.Float.Input("adalora_orth_reg", default=d.adalora_orth_reg, min=0.0, max=10.0, step=0.05,
                       tooltip="AdaLoRA: weight of the regulariser that keeps P and Q orthogonal (PEFT: 0.5)."),
    ]


def _augmentation_inputs(d: TrainConfig) -> list:
    return [
        io.Boolean.Input("flip", default=d.flip, tooltip="Mirror images horizontally at random."),
        io.Boolean.Input("random_crop", default=d.random_crop,
                         tooltip="Train on random windows (at least 64% of the area, aspect kept) instead of whole "
                                 "images; 4 views per image are encoded before training."),
        io.Float.Input("color_jitter", default=d.color_jitter, min=0.0, max=0.5, step=0.01,
                       tooltip="Random brightness, contrast, saturation (up to +-this) and hue changes; 0 = off. "
                               "4 views per image are encoded before training."),
    ]


def _checkpoint_inputs(d: TrainConfig) -> list:
    return [
        io.Int.Input("save_every", default=d.save_every, min=0, max=100000,
                     tooltip="Write a checkpoint file every this many steps (0: only the final file)."),
        io.Combo.Input("save_precision", options=list(SAVE_PRECISIONS), default=d.save_precision,
                       tooltip="Precision of the saved file: fp16 (half the size of fp32, read everywhere), bf16, "
                               "or fp32 (exactly the trained weights)."),
        io.Combo.Input("resume_from", options=[NO_RESUME] + adapter_files(), default=NO_RESUME,
                       tooltip="Continue training a B-LoRA this node wrote (same blocks, rank, alpha, algorithm); "
                               "its steps add up in the new file."),
    ]


def _memory_inputs(d: TrainConfig) -> list:
    return [
        io.Int.Input("batch_size", default=d.batch_size, min=1, max=64,
                     tooltip="Images per micro-batch (with several sizes of image, keep 1)."),
        io.Int.Input("grad_accumulation", default=d.grad_accumulation, min=1, max=1024,
                     tooltip="Micro-batches summed into each optimizer step."),
        io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING), default=d.gradient_checkpointing,
                       tooltip="Recompute activations in backward: less memory, slower. trained blocks: the layers "
                               "from the first trained block on; all above: also the layers below it; off: none."),
        io.Boolean.Input("offload", default=d.offload,
                         tooltip="Keep what training does not need at the moment off the GPU (less VRAM, slower)."),
    ]


class SettingsGroup:
    """One settings node: its socket type, display name and inputs (TrainConfig fields, except resume_from)."""

    def __init__(self, node_id: str, display_name: str, socket: str, input_of, description: str):
        self.node_id, self.display_name, self.description = node_id, display_name, description
        self.type = io.Custom(socket)
        self.input_of = input_of
        self.socket = socket

    def names(self) -> list[str]:
        return [i.id for i in self.input_of(TrainConfig())]


GROUPS = {
    "algorithm_options": SettingsGroup(
        "BLoRAAlgorithmOptions", "B-LoRA Algorithm Options", "BLORA_ALGORITHM_OPTIONS", _algorithm_inputs,
        "Options of the training algorithm for Train B-LoRA: rsLoRA, initialisation, optimizer, weight decay, "
        "LoRA+, and the options of DoRA/LoKr/LoHa/AdaLoRA. Unwired: the paper's recipe."),
    "augmentation": SettingsGroup(
        "BLoRAAugmentation", "B-LoRA Augmentation", "BLORA_AUGMENTATION", _augmentation_inputs,
        "Augmentation of the training images for Train B-LoRA (flip, random crops, colour jitter). Unwired: none, "
        "as the paper trains."),
    "checkpoints": SettingsGroup(
        "BLoRACheckpoints", "B-LoRA Checkpoints", "BLORA_CHECKPOINTS", _checkpoint_inputs,
        "Checkpoint files, saved precision and resuming for Train B-LoRA. Unwired: only the final file, fp16."),
    "memory": SettingsGroup(
        "BLoRAMemoryOptions", "B-LoRA Memory Options", "BLORA_MEMORY_OPTIONS", _memory_inputs,
        "Batch size, gradient accumulation, gradient checkpointing and offloading for Train B-LoRA. Unwired: batch "
        "1, checkpointing of the trained blocks, no offload."),
}
ValidationType = io.Custom("BLORA_VALIDATION")


def _settings_node(key: str, group: SettingsGroup) -> type[io.ComfyNode]:
    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            register_output_loras()  # trained files (output/loras) are listed for resume_from
            return io.Schema(node_id=group.node_id, display_name=group.display_name, category=CATEGORY,
                             description=group.description, inputs=group.input_of(TrainConfig()),
                             outputs=[group.type.Output(display_name=key, tooltip=f"Wire into Train B-LoRA's {key}.")])

        @classmethod
        def execute(cls, **values) -> io.NodeOutput:
            return io.NodeOutput(dict(values))

    Node.__name__ = Node.__qualname__ = group.node_id
    return Node


SETTINGS_NODES = [_settings_node(key, group) for key, group in GROUPS.items()]


def encode(clip, text: str):
    """A prompt encoded as CLIPTextEncode encodes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class BLoRAValidation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = ValidationSettings()
        return io.Schema(
            node_id="BLoRAValidation", display_name="B-LoRA Validation", category=CATEGORY,
            description="Validation previews for Train B-LoRA: at step 0, every `every` steps and at the end it "
                        "samples content only, style only and both (one row per seed) with the host's sampler on "
                        "the training model, shows the rows on the node and saves them beside the trained file.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder for the preview prompts (the checkpoint's CLIP)."),
                io.Int.Input("every", default=d.every, min=0, max=100000,
                             tooltip="Steps between two preview rows (0: only at step 0 and at the end)."),
                io.Int.Input("steps", default=d.steps, min=1, max=200, tooltip="Sampler steps of each preview."),
                io.Float.Input("cfg", default=d.cfg, min=0.1, max=30.0, step=0.1, tooltip="Guidance scale."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=d.sampler,
                               tooltip="The host's sampler, as KSampler's."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=d.scheduler,
                               tooltip="The host's scheduler, as KSampler's."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Noise seed: the same noise for every view, seed and step."),
                io.Int.Input("width", default=d.width, min=64, max=4096, step=8, tooltip="Preview width."),
                io.Int.Input("height", default=d.height, min=64, max=4096, step=8, tooltip="Preview height."),
                io.String.Input("trigger", default=d.trigger,
                                tooltip="The token of the training caption ('A [v]' by default); [v] (content) and "
                                        "[s] (style) in the prompts become it."),
                io.String.Input("content_prompt", default=d.content_prompt, multiline=True,
                                tooltip="Prompt of the content-only view (only the content block's adapters on)."),
                io.String.Input("style_prompt", default=d.style_prompt, multiline=True,
                                tooltip="Prompt of the style-only view (only the style block's adapters on)."),
                io.String.Input("both_prompt", default=d.both_prompt, multiline=True,
                                tooltip="Prompt of the view with every trained block on."),
                io.String.Input("negative_prompt", default=d.negative_prompt, multiline=True,
                                tooltip="Negative prompt of every view."),
            ],
            outputs=[ValidationType.Output(display_name="validation",
                                           tooltip="Wire into Train B-LoRA's validation.")])

    @classmethod
    def execute(cls, clip, every, steps, cfg, sampler_name, scheduler, seed, width, height, trigger,
                content_prompt, style_prompt, both_prompt, negative_prompt) -> io.NodeOutput:
        settings = ValidationSettings(every=every, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler,
                                      seed=seed, width=width, height=height, trigger=trigger,
                                      content_prompt=content_prompt, style_prompt=style_prompt,
                                      both_prompt=both_prompt, negative_prompt=negative_prompt)
        positive = {view: encode(clip, settings.prompt(view)) for view in ("content", "style", "both")}
        return io.NodeOutput(Validation(settings, positive, encode(clip, negative_prompt)))


NODES = [*SETTINGS_NODES, BLoRAValidation]
