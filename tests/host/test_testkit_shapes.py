"""The test kit's attention shapes are the real tiny model's."""
from blora_testkit.dialects import TINY_ATTN_SHAPES


def test_tiny_attention_shapes_match_the_model(tiny_model):
    weights = {k[len("diffusion_model."):-len(".weight")]: tuple(v.shape)
               for k, v in tiny_model.model.state_dict().items()
               if k.startswith("diffusion_model.") and ".attn" in k and k.endswith(".weight")}
    assert weights == TINY_ATTN_SHAPES
    assert len(TINY_ATTN_SHAPES) == 11 * 8
