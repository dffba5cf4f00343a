"""Pretrained weights from local caches: torchvision's (the torch hub cache) and timm's (the Hugging Face cache, or
one plain file in the torch hub cache). Nothing is downloaded when `DISTILLSTUDY_OFFLINE` is set (any value but
empty or 0): a missing file is reported at once, as one line naming the file to put where, instead of waiting on
the network.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import torch

from .errors import UserError

OFFLINE_ENV = "DISTILLSTUDY_OFFLINE"


def offline() -> bool:
    """Whether downloading is forbidden (`DISTILLSTUDY_OFFLINE`)."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def hub_checkpoint_path(filename: str) -> str:
    """Where torch.hub keeps a downloaded checkpoint: `$TORCH_HOME/hub/checkpoints/<filename>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def torchvision_state_dict(name: str, label: str | None = None) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT weights for model `name`, from the hub cache or downloaded; UserError when
    unavailable (no weights, offline and not on disk, a failed download or a bad file)."""
    from torchvision.models import get_model_weights

    label = label or name
    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision has no pretrained weights for {label}") from None
    # The path torch.hub.load_state_dict_from_url reads, so the message points at the file it would use.
    path = hub_checkpoint_path(os.path.basename(urlparse(weights.url).path))
    fix = f"download {weights.url} and save it as {path}"
    if not os.path.exists(path) and offline():
        raise UserError(f"pretrained {label} weights are not on disk and {OFFLINE_ENV} forbids downloading: {fix}")
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # network, disk, hash or unpickling failures all mean the same thing to the user
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(f"cannot load pretrained {label} weights ({reason}); {fix}") from e


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB first-convolution kernel (out, 3, k, k) for `in_channels` inputs: summed over RGB and divided by
    `in_channels` for every channel, so an image whose channels all hold one grey value gets the response the RGB
    network gave that grey image."""
    return weight.sum(1, keepdim=True).div(in_channels).repeat(1, in_channels, 1, 1)


def _timm_source(name: str) -> tuple[str, str, str | None, str]:
    """(url, local file, Hugging Face hub id, file name in the hub) of timm model `name`'s pretrained weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"timm has no pretrained weights for timm:{name}")
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}"
        return url, hub_checkpoint_path(cfg.hf_hub_id.replace("/", "--") + os.path.splitext(filename)[1]), \
            cfg.hf_hub_id, filename
    return cfg.url, hub_checkpoint_path(os.path.basename(urlparse(cfg.url).path)), None, ""


def timm_weights_file(name: str) -> str | None:
    """The local file of timm model `name`'s pretrained weights, or None when downloading is allowed and nothing
    is cached (timm then downloads into the Hugging Face cache). Looks at `$TORCH_HOME/hub/checkpoints/<hub id with
    / as -->.safetensors`, then the Hugging Face cache; offline and in neither, a UserError naming the file."""
    url, path, hub_id, filename = _timm_source(name)
    if os.path.exists(path):
        return path
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for candidate in dict.fromkeys((filename, "pytorch_model.bin")):
            cached = try_to_load_from_cache(hub_id, candidate)
            if isinstance(cached, str) and os.path.exists(cached):
                return cached
    if offline():
        raise UserError(f"pretrained timm:{name} weights are not cached and {OFFLINE_ENV} forbids downloading: "
                        f"{timm_download_fix(name)}")
    return None


def timm_download_fix(name: str) -> str:
    """What to do when timm cannot find `name`'s weights: the file `timm_weights_file` reads first."""
    url, path, _, _ = _timm_source(name)
    return f"download {url} and save it as {path}"
