"""Networks from outside the registry, named in `model.arch`:

    torchvision:NAME           any torchvision classification builder (`torchvision.models.list_models`)
    timm:NAME                  any timm model (the optional extra: pip install 'distillstudy[timm]')
    package.module:function    a user's builder, called with `num_classes` and `in_channels` (and `width`,
                               `pretrained` when it takes them)

Each is shaped for the task: the classifier gives `num_classes` logits and the first convolution takes
`in_channels`. torchvision networks are built with their own `num_classes`; a pretrained one loads every weight but
the classifier's, and `in_channels != 3` sums the RGB kernel of the first convolution (`weights.adapt_stem`, which
also keeps a random kernel's scale). timm does both itself (`num_classes`, `in_chans`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import InvalidChoice, UserError, did_you_mean, first_line
from .imports import is_import_path, load_callable, source_fingerprint
from .weights import adapt_stem, timm_download_fix, timm_weights_file, torchvision_state_dict

TIMM_INSTALL = "pip install 'distillstudy[timm]'"


@dataclass(frozen=True)
class NetworkSource:
    """How to build one external architecture: `build(num_classes, in_channels, width, pretrained)`."""

    arch: str
    build: Callable[[int, int, float, bool], nn.Module]
    fingerprint: str  # what the weights' meaning depends on beyond the name (library version, user source)


def is_external(arch: str) -> bool:
    """Whether `arch` names a network outside the registry (`torchvision:`, `timm:`, `package.module:function`)."""
    return ":" in arch


def network_source(arch: str) -> NetworkSource:
    """The source of external architecture `arch`; a one-line UserError for an unknown name or a missing package."""
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        return _torchvision(arch, name)
    if kind == "timm":
        return _timm(arch, name)
    if is_import_path(arch):
        return _user(arch)
    raise UserError(f"model.arch '{arch}': expected torchvision:NAME, timm:NAME or package.module:function")


def _no_width(arch: str, width: float) -> None:
    if width != 1.0:
        raise InvalidChoice(f"{arch} cannot be built at width {width:g} (only user builders that take `width` "
                            "can): use replace_with reinit or donor, and model.width/model.donor_width 1")


# --- torchvision ------------------------------------------------------------------------------------------------

def _torchvision(arch: str, name: str) -> NetworkSource:
    import torchvision
    from torchvision import models

    names = models.list_models(module=models)  # classification builders only
    if name not in names:
        raise UserError(f"unknown torchvision classification model '{name}'{did_you_mean(name, names)}; "
                        f"see torchvision.models.list_models(module=torchvision.models)")
    builder = models.get_model_builder(name)

    def build(num_classes: int, in_channels: int, width: float, pretrained: bool) -> nn.Module:
        _no_width(arch, width)
        net = builder(weights=None, num_classes=num_classes)
        if pretrained:
            _load_classifier_free(net, torchvision_state_dict(name, arch), arch)
        if in_channels != 3:
            _adapt_first_conv(net, in_channels, arch)
        return net

    return NetworkSource(arch, build, f"torchvision {torchvision.__version__}")


def _last_linear(net: nn.Module) -> str | None:
    return next((n for n, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)


def _load_classifier_free(net: nn.Module, state: dict, arch: str) -> None:
    """Load pretrained `state` into `net`, except its classifier (the last Linear, kept freshly initialised for the
    task's classes) and any tensor shaped by the number of classes."""
    head = _last_linear(net)
    own = net.state_dict()
    keep = {k: v for k, v in state.items()
            if k in own and own[k].shape == v.shape and not (head and k.startswith(head + "."))}
    result = net.load_state_dict(keep, strict=False)
    skipped = [k for k in result.missing_keys if not (head and k.startswith(head + "."))]
    unused = sorted(set(state) - set(own))
    if skipped or unused:  # a torchvision layout change, not something the user can fix in a config
        raise RuntimeError(f"{arch}: pretrained weights do not fit (not loaded: {skipped[:3]}, unused: {unused[:3]})")


def _adapt_first_conv(net: nn.Module, in_channels: int, arch: str) -> None:
    path, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise UserError(f"{arch}: cannot adapt the first convolution to {in_channels} input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    new.weight.data.copy_(adapt_stem(conv.weight.data, in_channels))
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    net.set_submodule(path, new)


# --- timm -------------------------------------------------------------------------------------------------------

def _timm(arch: str, name: str) -> NetworkSource:
    try:
        import timm
    except ImportError:
        raise UserError(f"{arch} needs timm, an optional extra: {TIMM_INSTALL}") from None
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}; see timm.list_models()")

    def build(num_classes: int, in_channels: int, width: float, pretrained: bool) -> nn.Module:
        _no_width(arch, width)
        kwargs = {"num_classes": num_classes, "in_chans": in_channels}
        if not pretrained:
            return timm.create_model(name, **kwargs)
        path = timm_weights_file(name)
        if path:
            kwargs["pretrained_cfg_overlay"] = {"file": path}
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, cache or file failures all mean the same to the user
            raise UserError(f"cannot load pretrained {arch} weights ({type(exc).__name__}: {first_line(exc)}); "
                            f"{timm_download_fix(name)}") from None

    return NetworkSource(arch, build, f"timm {timm.__version__}")


# --- a user's builder -------------------------------------------------------------------------------------------

def _user(arch: str) -> NetworkSource:
    fn = load_callable(arch, "model.arch")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def build(num_classes: int, in_channels: int, width: float, pretrained: bool) -> nn.Module:
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if width != 1.0:
            if "width" not in params and not takes_any:
                raise InvalidChoice(f"{arch} cannot be built at width {width:g}: give it a `width` argument (hidden "
                                    "width factor) for slim replacements and model.width/model.donor_width")
            kwargs["width"] = width
        if pretrained:
            if "pretrained" not in params and not takes_any:
                raise UserError(f"model.teacher pretrained: {arch} takes no `pretrained` argument; use "
                                "model.teacher: checkpoint with a state_dict file")
            kwargs["pretrained"] = True
        call = f"{arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        try:
            net = fn(**kwargs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code failed: one line, not their traceback
            raise UserError(f"model.arch: {call} failed: {type(exc).__name__}: {first_line(exc)}") from None
        if not isinstance(net, nn.Module):
            raise UserError(f"model.arch: {call} returned {type(net).__name__}, not a torch.nn.Module")
        return net

    return NetworkSource(arch, build, source_fingerprint(fn))
