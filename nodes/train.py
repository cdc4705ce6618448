"""Train B-LoRA: train one image (or a few) into content and style blocks, in the graph, on the host's patcher."""
from __future__ import annotations

from comfy_api.latest import io

from ..blora.errors import BLoRAError
from ..blora.formats.files import read_adapter
from ..blora.train.loss_history import loss_map
from ..blora.host.train import train_blora
from ..blora.host.train_seeds import train_blora_seeds
from ..blora.host.output_files import register_output_loras
from ..blora.adapters.kinds.lora import INITIALISATIONS
from ..blora.train.recipe import (ALGORITHMS, BLOCK_PRESETS, OPTIMIZERS, SAVE_PRECISIONS, SEED_DRAWS, TRAINING_DTYPES,
                                  TrainConfig)
from .folders import adapter_files, adapter_path
from .dataset import TrainingSetType
from .types import BLoRA

NO_RESUME = "none"


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
                               "recommended for style; see the lokr_ options and dora_wd); AdaLoRA (SVD-form "
                               "adapters whose rank moves to the layers that need it, from rank down to "
                               "adalora_target_rank on average; saved as plain LoRA with a rank per layer)."),
        io.Boolean.Input("rslora", default=d.rslora,
                         tooltip="Rank-stabilised scale alpha/sqrt(rank); the file stores alpha*sqrt(rank)."),
        io.Float.Input("learning_rate", default=d.learning_rate, min=1e-7, max=1.0, step=1e-6, round=False,
                       tooltip="Constant learning rate (the paper: 5e-5)."),
        io.Float.Input("loraplus_ratio", default=d.loraplus_ratio, min=0.01, max=64.0, step=0.5,
                       tooltip="LoRA+: the up matrices learn this many times faster (1 = off; the LoRA+ paper "
                               "suggests 16)."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=d.optimizer,
                       tooltip="AdamW (betas 0.9/0.999, eps 1e-8, the paper's) or plain SGD."),
        io.Float.Input("weight_decay", default=d.weight_decay, min=0.0, max=1.0, step=1e-5, round=False,
                       tooltip="Weight decay of the adapter parameters (the paper: 1e-4)."),
        io.Int.Input("steps", default=d.steps, min=1, max=100000, tooltip="Optimizer steps (the paper: 1000)."),
        io.Int.Input("batch_size", default=d.batch_size, min=1, max=64,
                     tooltip="Images per micro-batch (with several sizes of image, keep 1)."),
        io.Int.Input("grad_accumulation", default=d.grad_accumulation, min=1, max=1024,
                     tooltip="Micro-batches summed into each optimizer step."),
        io.Int.Input("resolution", default=d.resolution, min=64, max=4096, step=8,
                     tooltip="Short side of the training images in pixels (aspect kept, no crop)."),
        io.Boolean.Input("flip", default=d.flip, tooltip="Mirror images horizontally at random (augmentation)."),
        io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                     tooltip="Seed of the adapter initialisation, timesteps and noise: same seed, same weights."),
        io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default=d.training_dtype,
                       tooltip="Compute dtype of the forward and backward (adapter weights stay float32)."),
        io.Boolean.Input("gradient_checkpointing", default=d.gradient_checkpointing != "off",
                         tooltip="Recompute activations of the trained part in backward: less memory, slower."),
        io.Int.Input("save_every", default=d.save_every, min=0, max=100000,
                     tooltip="Write a checkpoint file every this many steps (0: only the final file)."),
        io.String.Input("filename_prefix", default="blora/blora",
                        tooltip="Name of the file written to output/loras/ (a counter is added; subfolders allowed)."),
        io.Combo.Input("resume_from", options=[NO_RESUME] + adapter_files(), default=NO_RESUME, optional=True,
                       tooltip="Continue training a B-LoRA this node wrote (same blocks, rank, alpha, algorithm); "
                               "its steps add up in the new file."),
        io.Combo.Input("init", options=list(INITIALISATIONS), default=d.init, optional=True,
                       tooltip="How a fresh run draws the down matrices (up starts at zero): gaussian, std 1/rank, "
                               "as the original B-LoRA training (diffusers, PEFT init 'gaussian'); kaiming_uniform, "
                               "uniform in +-1/sqrt(in features), PEFT's default."),
        TrainingSetType.Input("training_set", optional=True,
                              tooltip="Images with a caption each (Load B-LoRA Training Folder, B-LoRA Training "
                                      "Set), used instead of images and positive. Mixed sizes are bucketed."),
        io.Boolean.Input("random_crop", default=d.random_crop, optional=True,
                         tooltip="Augmentation: train on random windows (at least 64% of the area, aspect kept) "
                                 "instead of whole images; 4 views per image are encoded before training."),
        io.Float.Input("color_jitter", default=d.color_jitter, min=0.0, max=0.5, step=0.01, optional=True,
                       tooltip="Augmentation: random brightness, contrast, saturation (up to +-this) and hue "
                               "changes; 0 = off. 4 views per image are encoded before training."),
        io.Combo.Input("save_precision", options=list(SAVE_PRECISIONS), default=d.save_precision, optional=True,
                       tooltip="Precision of the saved file: fp16 (half the size of fp32, read everywhere), bf16, "
                               "or fp32 (exactly the trained weights)."),
        io.Int.Input("seeds", default=d.seeds, min=1, max=16, optional=True,
                     tooltip="Train this many B-LoRAs at once, initialised from seed, seed+1, …, in one batched "
                             "forward and backward (plain LoRA; no resume). Each is saved as <prefix>_seed<S>; the "
                             "outputs carry the first. Some seeds separate content and style better than others."),
        io.Combo.Input("seed_draws", options=list(SEED_DRAWS), default=d.seed_draws, optional=True,
                       tooltip="With seeds > 1: shared: every seed trains on the timesteps and noise of `seed` (the "
                               "layers below the first trained block then run once for all seeds: faster). own: "
                               "seed+n draws its own, exactly as a run with that seed alone."),
        *_algorithm_inputs(d),  # last: UI workflows keep widget values by position
    ]


def _algorithm_inputs(d: TrainConfig) -> list:
    """Options of one algorithm each (optional and last, so workflows saved before them still run with the
    defaults)."""
    return [
        io.Boolean.Input("dora_wd", default=d.dora_wd, optional=True,
                         tooltip="LoKr/LoHa only: add DoRA's magnitude on top (LyCORIS dora_wd), on the input axis: "
                                 "a (1, in) dora_scale that stock ComfyUI renders exactly (LyCORIS: wd_on_out=False)."),
        io.Int.Input("lokr_factor", default=d.lokr_factor, min=-1, max=1024, optional=True,
                     tooltip="LoKr: how each dimension is split for the Kronecker product (LyCORIS factor). -1 = "
                             "most balanced split (e.g. 1280 -> 32 x 40); a small factor (4, 8) gives a small "
                             "first factor and more trainable weights in the second."),
        io.Boolean.Input("lokr_decompose_both", default=d.lokr_decompose_both, optional=True,
                         tooltip="LoKr: factor the small Kronecker matrix (w1) at rank too, not only w2 (fewer "
                                 "weights; LyCORIS decompose_both)."),
        io.Boolean.Input("lokr_full_matrix", default=d.lokr_full_matrix, optional=True,
                         tooltip="LoKr: keep both Kronecker factors full (no rank; alpha is ignored). LyCORIS also "
                                 "switches to a full w2 on its own when rank is at least half its size."),
        io.Int.Input("adalora_target_rank", default=d.adalora_target_rank, min=0, max=1024, optional=True,
                     tooltip="AdaLoRA: the average rank per layer at the end (rank is the initial rank; 0 = half of "
                             "it); the total budget goes to the layers whose triplets score as most important."),
        io.Float.Input("adalora_warmup", default=d.adalora_warmup, min=0.0, max=0.99, step=0.05, optional=True,
                       tooltip="AdaLoRA: fraction of the steps trained at the initial rank before pruning starts."),
        io.Float.Input("adalora_final", default=d.adalora_final, min=0.0, max=0.99, step=0.05, optional=True,
                       tooltip="AdaLoRA: fraction of the steps (at the end) trained at the target budget, the "
                               "rank pattern fixed."),
        io.Int.Input("adalora_interval", default=d.adalora_interval, min=1, max=10000, optional=True,
                     tooltip="AdaLoRA: steps between two reallocations of the budget while it falls."),
        io.Float.Input("adalora_orth_reg", default=d.adalora_orth_reg, min=0.0, max=10.0, step=0.05, optional=True,
                       tooltip="AdaLoRA: weight of the regulariser that keeps P and Q orthogonal (PEFT: 0.5)."),
    ]


class BLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_output_loras()  # trained files (output/loras) are listed for resume_from and stock LoraLoader
        return io.Schema(
            node_id="BLoRATrain", display_name="Train B-LoRA", category="B-LoRA/train",
            description="Train a B-LoRA from one image (or a training set of captioned images): LoRA adapters on the "
                        "attention layers of the content and style blocks (the paper's recipe by default; on FLUX.1 "
                        "the single blocks of SplitFlux's split, trained on the flow-matching objective), saved "
                        "to output/loras/ in the kohya format. Returns the model with the trained B-LoRA applied, and the B-LoRA.",
            inputs=_inputs(),
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The input model with the trained B-LoRA at "
                                                                   "strength 1."),
                     BLoRA.Output(display_name="BLORA", tooltip="The trained B-LoRA (for Apply B-LoRA and the "
                                                                "other B-LoRA nodes)."),
                     io.Custom("LOSS_MAP").Output(display_name="loss_map",
                                                  tooltip="The loss of every step, for the host's Plot Loss "
                                                          "Graph (also kept in the file's metadata).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True)

    @classmethod
    def execute(cls, model, vae, filename_prefix: str, images=None, positive=None, resume_from: str | None = None,
                training_set=None, **settings) -> io.NodeOutput:
        config = TrainConfig(**settings)
        if training_set is not None:
            images, positive = training_set.images, training_set.conditioning
        if images is None or positive is None:
            raise BLoRAError("connect a training_set, or images and positive")
        resume = None if resume_from in (None, "", NO_RESUME) else read_adapter(adapter_path(resume_from))
        if config.seeds > 1:
            return _train_seeds(model, vae, images, positive, config, filename_prefix, resume, cls.hidden.unique_id)
        out = train_blora(model, vae, images, positive, config, filename_prefix=filename_prefix, resume=resume,
                          node_id=cls.hidden.unique_id)
        ui = {"loss": out.losses, "elapsed": [out.elapsed]}
        if config.algorithm == "AdaLoRA":
            ui["ranks"] = [out.ranks]
        return io.NodeOutput(out.model, out.adapter, loss_map(out.losses), ui=ui)



def _train_seeds(model, vae, images, positive, config, filename_prefix, resume, node_id) -> io.NodeOutput:
    """seeds > 1: every seed's file is written; the outputs carry the first seed, the UI every seed's losses."""
    if resume is not None:
        raise BLoRAError("resume_from works with seeds = 1: resume one seed's file on its own")
    outs = train_blora_seeds(model, vae, images, positive, config, filename_prefix=filename_prefix, node_id=node_id)
    first = outs[0]
    return io.NodeOutput(first.model, first.adapter, loss_map(first.losses), ui={
        "loss": first.losses, "elapsed": [first.elapsed], "seed_losses": [o.losses for o in outs],
        "seeds": [config.seed + n for n in range(config.seeds)], "files": [o.path for o in outs]})


NODES = [BLoRATrain]
