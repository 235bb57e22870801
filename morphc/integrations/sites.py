"""Sites found on the module tree, for extending a model in place inside someone else's trainer.

A trainer holds its own reference to the model (and accelerate patches ``model.forward`` for
autocast), so the integrations never trace or swap the model: a site is a *module* whose forward
is one linear operator on its own weight — ``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` and Hugging Face's ``Conv1D`` (``addmm(b, x, W)``, W stored
``(in, out)``) — and its branch is added to that module's output by a forward hook.

Excluded, with the reason in ``table.explain()``: a weight held by more than one module (tied
``lm_head``/embedding), a weight computed by a parametrization or by weight norm, lazy modules not
yet materialised, and the projections of ``nn.MultiheadAttention`` (its fused call reads
``out_proj.weight`` without calling ``out_proj``, so a hook would never fire). A shared module
(one object under two names, called twice) is one site: its branch joins every call, and the
fold changes the module's weight for every call alike.

What a module-level view cannot see: a forward that reads ``layer.weight`` directly instead of
calling ``layer``. Such a site gets no gradient in its branch, so ``B`` stays 0 and the fold adds
nothing — wasted, never wrong.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from morphc.ir.sites import ConvConfig, Site, SiteTable, SiteUse


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT, ...), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
        getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _ConvNd):
        return "conv_transpose" if module.transposed else "conv"
    if _hf_conv1d(module):
        return "matmul_right"
    return None


def _conv_config(module: _ConvNd) -> ConvConfig:
    return ConvConfig(dim=len(module.kernel_size), kernel_size=tuple(module.kernel_size),
                      stride=tuple(module.stride), padding=module.padding,
                      dilation=tuple(module.dilation), groups=module.groups,
                      padding_mode=module.padding_mode, transposed=module.transposed,
                      output_padding=tuple(module.output_padding))


def _why_not(module: nn.Module, kind: str, owners: dict[int, set[int]],
             mha_children: set[int]) -> str | None:
    if parametrize.is_parametrized(module):
        return "its weight is computed by a parametrization (not a parameter to fold into)"
    weight = module._parameters.get("weight")
    if weight is None:
        return "it has no weight parameter (weight norm or a computed weight)"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "a lazy module not materialised yet; run one batch before training"
    if len(owners.get(id(weight), ())) > 1:
        return "its weight is tied to another module (a fold would change that one too)"
    bias = module._parameters.get("bias")
    if bias is not None and len(owners.get(id(bias), ())) > 1:
        return "its bias is shared with another module"
    if id(module) in mha_children:
        return ("a projection of nn.MultiheadAttention, whose fused call reads the weight "
                "without calling the module")
    if kind == "conv" and module.padding_mode != "zeros" and isinstance(module.padding, str):
        return f"padding={module.padding!r} with padding_mode={module.padding_mode!r}"
    return None


def _site(name: str, module: nn.Module, kind: str) -> Site:
    weight = module.weight
    if kind == "matmul_right":
        in_f, out_f = weight.shape
    elif kind == "linear":
        out_f, in_f = weight.shape
    else:
        in_f, out_f = module.in_channels, module.out_channels
    bias_name = qualified(name, "bias") if module._parameters.get("bias") is not None else None
    conv = _conv_config(module) if kind in ("conv", "conv_transpose") else None
    return Site(name=name or "<root>", kind=kind, weight_name=qualified(name, "weight"),
                in_features=int(in_f), out_features=int(out_f), conv=conv,
                uses=[SiteUse(node=name, op=type(module).__name__, input_arg=0,
                              bias_name=bias_name)],
                bias_foldable=bias_name is not None)


def module_sites(model: nn.Module) -> tuple[SiteTable, dict[str, nn.Module]]:
    """The site table of ``model``'s module tree, and each site's module by site name.

    >>> table, modules = module_sites(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    >>> [s.name for s in table.extendable()], sorted(modules)
    (['0', '2'], ['0', '2'])
    """
    owners: dict[int, set[int]] = {}
    mha_children: set[int] = set()
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(id(module))
        if isinstance(module, nn.MultiheadAttention):
            mha_children.update(id(m) for m in module.modules() if m is not module)
    table, modules = SiteTable(), {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        reason = _why_not(module, kind, owners, mha_children)
        weight = module._parameters.get("weight")
        if reason is not None and (weight is None or
                                   isinstance(weight, nn.parameter.UninitializedParameter)):
            table.exclusions[qualified(name, "weight")] = reason
            continue
        site = _site(name, module, kind)
        site.excluded = reason
        table[site.name] = site
        modules[site.name] = module
    return table, modules
