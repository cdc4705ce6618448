"""The tiny FLUX.1-architecture model config the test server loads single-file FLUX checkpoints with (TEST-ONLY).

Diffusion model: the widths of blora_testkit.tiny_flux.TINY_FLUX_CONFIG (hidden 64, 4 heads, axes 4+6+6, 2 double
and 12 single blocks, context 32, pooled 32, guidance embedding: FLUX.1 dev). The host's detector reads the block
counts and the pooled width from the weights but assumes FLUX.1's hidden size, heads and rotary axes (0.3.64 also
its context width), so the config matches on what is detected (``vec_in_dim`` 32 is no real model's) and states the
rest. Text encoders: FLUX.1's pair as the host encodes it (FluxClipModel: T5's last hidden state as the context,
CLIP-L's pooled output as ``vec``), CLIP-L of hidden size 32 (3 layers, the full 49408-token vocabulary so the host's
tokenizer files work) and a T5 v1.1-style encoder (gated GELU) of d_model 32, 2 layers, the full 32128-token vocabulary.
Checkpoint keys as in Comfy-Org's single-file FLUX.1 checkpoints: ``model.diffusion_model.*``,
``text_encoders.clip_l.transformer.*``, ``text_encoders.t5xxl.transformer.*``, ``vae.*`` (TAESD, 16 latent channels).
Self-contained (installed as a custom node on its own).
"""
from __future__ import annotations

import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.t5
from comfy import sd1_clip

from .tiny_models import text_config

HIDDEN = 64
CONTEXT_DIM = 32  # T5's d_model
POOLED_DIM = 32  # CLIP-L's hidden size (FLUX takes CLIP-L's pooled output without projection)


def t5_config() -> dict:
    return {"d_ff": 2 * CONTEXT_DIM, "d_kv": 16, "d_model": CONTEXT_DIM, "num_heads": 2, "num_layers": 2,
            "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-06,
            "relative_attention_num_buckets": 32, "vocab_size": 32128, "model_type": "t5", "eos_token_id": 1,
            "pad_token_id": 0, "decoder_start_token_id": 0, "tie_word_embeddings": False}


class TinyFluxClipL(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        config = {**text_config("quick_gelu"), "projection_dim": POOLED_DIM}
        assert config["hidden_size"] == POOLED_DIM
        super().__init__(device=device, textmodel_json_config=config, dtype=dtype, return_projected_pooled=False,
                         model_options={**model_options, "model_name": "clip_l"})


class TinyT5(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, layer="last", textmodel_json_config=t5_config(), dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         enable_attention_masks=False, return_attention_masks=False,
                         model_options={**model_options, "model_name": "t5xxl"})


class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
    """FLUX.1's text encoder pair (same encode logic: T5 context, CLIP-L pooled), tiny widths."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super(comfy.text_encoders.flux.FluxClipModel, self).__init__()
        self.clip_l = TinyFluxClipL(device=device, dtype=dtype, model_options=model_options)
        self.t5xxl = TinyT5(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype}


class TinyFlux(comfy.supported_models.Flux):
    """Matches only the tiny FLUX.1 dev layout (pooled width 32, 2 + 12 blocks); otherwise the host's Flux."""
    TINY_TESTKIT = True
    unet_config = {"image_model": "flux", "guidance_embed": True, "vec_in_dim": POOLED_DIM, "depth": 2,
                   "depth_single_blocks": 12}
    unet_extra_config = {"hidden_size": HIDDEN, "num_heads": 4, "axes_dim": [4, 6, 6], "context_in_dim": CONTEXT_DIM}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)
