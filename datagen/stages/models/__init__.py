"""Model backends (BLIP-2, LAVIS, GroundingDINO, SAM, SD inpainting) behind the stage interface.

Each module imports its heavy library inside ``__init__`` so that registering costs nothing.
"""

import importlib

for _module in ("sam", "groundingdino", "blip2", "lavis", "sd_inpaint"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _err:  # a backend module not written yet
        if _err.name != f"{__name__}.{_module}":
            raise
