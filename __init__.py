"""comfyui-blora: B-LoRA (implicit style-content separation) for ComfyUI.

The host is imported only inside ``comfy_entrypoint``, so the core package ``blora`` and its command line work
without ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import BLoRAExtension

    return BLoRAExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
