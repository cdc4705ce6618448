"""Files Train B-LoRA writes with algorithm LoKr and LoHa (plain and with dora_wd) load in LyCORIS and LyCORIS's own
forward gives the pack's trained weights.

Plain files load through LyCORIS's file loader (``create_lycoris_from_weights``). DoRA files hold an input-axis
(1, in) ``dora_scale``, the form stock ComfyUI renders exactly and LyCORIS trains with ``wd_on_out=False``; LyCORIS's
file loader cannot take it (it always rebuilds the output-axis form and fails to copy a (1, in) scale), so those
modules are built as LyCORIS builds them for ``dora_wd`` with ``wd_on_out=False`` and the file's tensors loaded into
them (``load_state_dict``, strict).

The adapters are made, moved off their zero start and exported by the trainer's own code (``blora.train.algorithms``:
``new_adapters`` → ``export`` → ``write_adapter`` in the kohya dialect, as ``Train B-LoRA`` saves); the host layer
shows that stock ComfyUI renders those files as the trained MODEL. Here: the same files through LyCORIS."""
from __future__ import annotations

import pytest
import torch

lycoris = pytest.importorskip("lycoris")

from safetensors.torch import load_file  # noqa: E402

from blora.adapters.adapter import Adapter, delta_weight  # noqa: E402
from blora.train.algorithms import REGISTRY, export, new_adapters  # noqa: E402
from blora.formats.files import read_adapter, write_adapter  # noqa: E402
from blora.train.recipe import TrainConfig  # noqa: E402

# Canonical paths with SDXL's attention Linears at two tiny widths (out, in): square, and cross-attention (k from a
# 64-wide context).
SHAPES = {"output_blocks.1.1.transformer_blocks.0.attn1.to_q": (128, 128),
          "output_blocks.1.1.transformer_blocks.0.attn2.to_k": (128, 64),
          "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0": (96, 160)}
VARIANTS = {
    "lokr": dict(algorithm="LoKr"),
    "lokr-factor-4": dict(algorithm="LoKr", lokr_factor=4),
    "lokr-decompose-both": dict(algorithm="LoKr", lokr_decompose_both=True, rank=2),
    "lokr-full": dict(algorithm="LoKr", lokr_full_matrix=True),
    "lokr-dora": dict(algorithm="LoKr", dora_wd=True, lokr_factor=4),
    "loha": dict(algorithm="LoHa"),
    "loha-dora": dict(algorithm="LoHa", dora_wd=True),
    "loha-rslora": dict(algorithm="LoHa", rslora=True),
}


class Tree(torch.nn.Module):
    """Linears at the canonical paths (dots as nested modules), so LyCORIS names them as kohya does."""

    def __init__(self, weights):
        super().__init__()
        for path, w in weights.items():
            parent = self
            *owners, leaf = path.split(".")
            for name in owners:
                if not hasattr(parent, name):
                    parent.add_module(name, torch.nn.Module())
                parent = getattr(parent, name)
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            parent.add_module(leaf, linear)


def _trained_file(tmp_path, settings):
    config = TrainConfig(**{"rank": 4, "alpha": 3.0, **settings})
    gen = torch.Generator().manual_seed(7)
    weights = {p: torch.randn(*s, generator=gen) * 0.05 for p, s in SHAPES.items()}
    adapters = new_adapters(weights, config)
    with torch.no_grad():  # as after training: every parameter away from its initial value
        for a in adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    path = write_adapter(Adapter(modules=export(adapters, torch.float32), source="trained"), tmp_path, "trained",
                         dialect="kohya")
    return weights, adapters, path


def _lycoris_file_loader(tree, path) -> list:
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        net, _ = create_lycoris_from_weights(1.0, None, tree, weights_sd=load_file(str(path)))
    finally:
        LycorisNetwork.LORA_PREFIX = old
    net.apply_to()
    return net.loras


def _lycoris_input_axis_dora(tree, path, settings) -> list:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    state = load_file(str(path))
    modules = []
    for module_path in SHAPES:
        name = "lora_unet_" + module_path.replace(".", "_")
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        linear = tree.get_submodule(module_path)
        common = dict(lora_dim=settings.get("rank", 4), alpha=float(own["alpha"]), weight_decompose=True,
                      wd_on_out=False)
        if settings["algorithm"] == "LoKr":
            module = LokrModule(name, linear, 1.0, factor=settings.get("lokr_factor", -1),
                                decompose_both=settings.get("lokr_decompose_both", False), **common)
        else:
            module = LohaModule(name, linear, 1.0, **common)
        module.load_state_dict(own, strict=True)
        module.apply_to()
        modules.append(module)
    return modules


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lycoris_forward_on_trained_files_gives_the_packs_weights(tmp_path, variant):
    settings = VARIANTS[variant]
    weights, adapters, path = _trained_file(tmp_path, settings)
    read = read_adapter(path)
    tree = Tree(weights)
    dora = settings.get("dora_wd", False)
    loras = _lycoris_input_axis_dora(tree, path, settings) if dora else _lycoris_file_loader(tree, path)
    assert len(loras) == len(SHAPES)
    assert {type(m).__name__ for m in loras} == {"LokrModule" if "lokr" in variant else "LohaModule"}
    for module_path, w in weights.items():
        inputs = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            theirs = tree.get_submodule(module_path)(inputs)
            trained = adapters[module_path](w)  # the weight the trained MODEL ran with
            module = read.modules[module_path]
            ours = inputs @ trained.T
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        if module.dora_scale is None:  # the plain delta: file -> pack core -> same numbers
            torch.testing.assert_close(w + delta_weight(module), trained, rtol=1e-5, atol=1e-6)
    assert {m.kind for m in read.modules.values()} == {REGISTRY[settings["algorithm"]].kind}
    assert all((m.dora_scale is not None) == dora for m in read.modules.values())
