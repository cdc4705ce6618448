"""The tiny SDXL-architecture model config the test server loads checkpoints with (TEST-ONLY).

UNet: the widths of blora_testkit.tiny_sdxl.TINY_UNET_CONFIG (model_channels 32, context_dim 64, adm 2816).
Text encoders: CLIP-L and CLIP-G of hidden size 32 each (concatenated: context 64), 3 layers (SDXL takes the
penultimate hidden state), the full 49408-token vocabulary so the host's tokenizer files work; CLIP-G's
projection maps 32 -> 1280 so the pooled output keeps SDXL's adm_in_channels 2816. VAE: TAESD (the host
detects it from the ``taesd_decoder.*`` keys). Self-contained: this folder is installed as a custom node
on its own, so it cannot import blora_testkit.
"""
from __future__ import annotations

import comfy.clip_model
import comfy.supported_models
import comfy.supported_models_base
from comfy import sd1_clip, sdxl_clip

TEXT_HIDDEN = 32
POOLED_DIM = 1280
VOCAB = 49408


def text_config(act: str) -> dict:
    """A transformers-style CLIP text config, tiny widths, real vocabulary and positions."""
    return {"hidden_size": TEXT_HIDDEN, "intermediate_size": 2 * TEXT_HIDDEN, "num_attention_heads": 2,
            "num_hidden_layers": 3, "hidden_act": act, "max_position_embeddings": 77, "vocab_size": VOCAB,
            "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1, "layer_norm_eps": 1e-05,
            "projection_dim": POOLED_DIM, "model_type": "clip_text_model"}


class ProjectedCLIPTextModel(comfy.clip_model.CLIPTextModel):
    """CLIPTextModel whose text projection widens the pooled output to 1280 (the stock one is square)."""

    def __init__(self, config_dict, dtype, device, operations):
        super().__init__(config_dict, dtype, device, operations)
        self.text_projection = operations.Linear(config_dict["hidden_size"], config_dict["projection_dim"],
                                                 bias=False, dtype=dtype, device=device)


class TinyClipL(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=text_config("quick_gelu"),
                         dtype=dtype, layer_norm_hidden_state=False,
                         model_options={**model_options, "model_name": "clip_l"})


class TinyClipG(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=text_config("gelu"),
                         dtype=dtype, model_class=ProjectedCLIPTextModel,
                         special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                         return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})


class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
    """SDXL's dual text encoder (same encode/concat logic), tiny widths."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super(sdxl_clip.SDXLClipModel, self).__init__()
        self.clip_l = TinyClipL(device=device, dtype=dtype, model_options=model_options)
        self.clip_g = TinyClipG(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype}


class TinySDXL(comfy.supported_models.SDXL):
    """Matches only the tiny UNet (model_channels 32, context 64); otherwise the host's SDXL."""
    TINY_TESTKIT = True
    unet_config = {
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 0, 1, 1, 1, 1],
        "context_dim": 64,
        "adm_in_channels": 2816,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
