"""Residual adapters: a small trained module inserted after a frozen layer group (the `adapt` action).

After a group with output y, the adapter gives y + U(V(y)), a residual whose update U is zero-initialised, so the
adapted model starts exactly equal to the model it came from (Rebuffi, Bilen & Vedaldi, 2017, "Learning multiple
visual domains with residual adapters"). The map U V acts on channels: at every position of a convolutional
group's (C, H, W) output through 1x1 convolutions, on the features of a linear group's (F,) output through linear
layers. Its rank r is the bottleneck's width: below C it is a low-rank residual (V: C -> r, drawn like any new
layer; U: r -> C, zero), and from C on a single full C x C map (zero), which is Rebuffi et al.'s 1x1 adapter.
Unlike theirs, the adapter has no BatchNorm of its own, so "starts equal" holds exactly in train mode too.

The adapted group itself stays frozen: `AdaptedGroup` keeps it in eval mode whatever mode the model is put in, so
its BatchNorm running statistics never move and its weights stay bit-identical.
"""

from __future__ import annotations

from torch import nn

from .grouped import GroupedModel, group_output_shapes
from .seeding import GLOBAL_RNG


class ResidualAdapter(nn.Module):
    """y + up(down(y)) with `up` zero-initialised (see the module docstring); `down` is absent at full rank."""

    def __init__(self, kind: str, channels: int, rank: int):
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"adapter kind must be conv or linear, not {kind!r}")
        layer = (lambda i, o, bias: nn.Conv2d(i, o, 1, bias=bias)) if kind == "conv" else nn.Linear
        self.kind, self.channels, self.rank = kind, channels, min(rank, channels)
        self.down = layer(channels, self.rank, False) if self.rank < channels else nn.Identity()
        self.up = layer(self.rank, channels, True)
        nn.init.zeros_(self.up.weight)  # zero update: the adapted group gives exactly what the group gave
        nn.init.zeros_(self.up.bias)

    def forward(self, y):
        return y + self.up(self.down(y))

    def spec(self) -> dict:
        """What rebuilds it (`ResidualAdapter(**spec)`)."""
        return {"kind": self.kind, "channels": self.channels, "rank": self.rank}


class AdaptedGroup(nn.Module):
    """A frozen layer group followed by its trained adapter. `group` is always in eval mode (BatchNorm statistics
    untouched) and has no gradient; only `adapter` trains."""

    def __init__(self, group: nn.Module, adapter: ResidualAdapter):
        super().__init__()
        self.group, self.adapter = group, adapter
        self.group.requires_grad_(False)
        self.group.eval()

    def train(self, mode: bool = True) -> AdaptedGroup:
        super().train(mode)
        self.group.eval()  # whatever the model's mode, the frozen group never updates its running statistics
        return self

    def forward(self, x):
        return self.adapter(self.group(x))


def adapter_for(output_shape: tuple[int, ...], rank: int) -> ResidualAdapter:
    """The adapter for a group whose per-sample output has `output_shape`: (C, H, W) -> conv on the channels,
    (F,) or (tokens, F) -> linear on the features. Raises ValueError for any other shape."""
    if output_shape is not None and len(output_shape) == 3:
        return ResidualAdapter("conv", output_shape[0], rank)
    if output_shape is not None and len(output_shape) in (1, 2):
        return ResidualAdapter("linear", output_shape[-1], rank)
    raise ValueError(f"no adapter for a group output of shape {output_shape} (need (C, H, W), (F,) or (tokens, F))")


def insert_adapter(model: GroupedModel, group: str, adapter: ResidualAdapter,
                   input_shape: tuple[int, ...] | None = None, after: str | None = None) -> str | None:
    """Put `adapter` on group `group`'s output. A built-in model's group is one module, wrapped whole in an
    `AdaptedGroup`. A network grouped by module names (`NetworkGroups`) keeps its own forward, so the adapter wraps
    the group's module whose output is the group's: `after` (its path in the network), else the one of the group's
    modules that runs last on an input of `input_shape`. Returns that path (None for a built-in model): what
    `add_adapters` needs to rebuild it."""
    from .network import NetworkGroups  # network.py imports grouped.py, as this module does

    if not isinstance(model, NetworkGroups):
        model.replace_group(group, AdaptedGroup(model.group_module(group), adapter))
        return None
    path = after or _last_to_run(model, group, input_shape)
    parent, _, leaf = path.rpartition(".")
    owner = model.net.get_submodule(parent) if parent else model.net
    setattr(owner, leaf, AdaptedGroup(getattr(owner, leaf), adapter))
    return path


def _last_to_run(model, group: str, input_shape: tuple[int, ...]) -> str:
    """The path of the module of `group` (a NetworkGroups group) that runs last on one sample of `input_shape`."""
    order: list[str] = []
    paths = [p for p in model.group_spec[group] if isinstance(_module_at(model.net, p), nn.Module)]
    handles = [model.net.get_submodule(p).register_forward_hook(lambda *_, p=p: order.append(p)) for p in paths]
    try:
        group_output_shapes(model, input_shape)  # one sample in eval mode, no gradient
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"layer group '{group}' has no module that runs (only bare parameters)")
    return order[-1]


def _module_at(net: nn.Module, path: str):
    try:
        return net.get_submodule(path)
    except AttributeError:  # a bare parameter (a class token)
        return None


def add_adapters(model: GroupedModel, specs: dict[str, dict]) -> GroupedModel:
    """Insert a fresh adapter after each group named in `specs` (group -> `ResidualAdapter.spec()`, as a trial's
    layer map records it under `adapter`, with `after` for a network grouped by module names), e.g. to load a saved
    adapted student's weights. Returns `model`."""
    for group, spec in specs.items():
        with GLOBAL_RNG:  # its draw is overwritten by the loaded weights, but must not interleave with a seeded one
            adapter = ResidualAdapter(spec["kind"], spec["channels"], spec["rank"])
        insert_adapter(model, group, adapter.to(_device(model)), after=spec.get("after"))
    return model


def _device(model: nn.Module):
    param = next(model.parameters(), None)
    return param.device if param is not None else "cpu"
