"""An extension that lives on the user's own modules: forward hooks add ``B·ρ_α(Ax + a)``.

The model object, its class, its ``state_dict`` keys and its ``forward`` stay as they are (a
trainer keeps its own reference to the model; accelerate patches ``model.forward`` for
autocast), and the branches are *not* submodules of it: ``model.parameters()`` and
``model.state_dict()`` never see them, so the trainer's own gradient clipping, parameter counts
and checkpoints see the user's model only. The branches reuse :class:`~morphc.ir.branch.
BypassBranch`, the per-kind fold of :func:`~morphc.passes.fold_extension.branch_deltas` and the
one write path :func:`~morphc.compiler.write.write_weights`, so a fold here is the same
arithmetic (float64, cast once) as ``morphc.contract``.

It offers what :class:`~morphc.runtime.cycle.Cycle` asks of an extension: ``branches``,
``set_homotopy``, ``homotopy`` and ``constraint_residual``.
"""

from __future__ import annotations

import torch
from torch import nn

from morphc.compiler.contract import VERIFY_TOLERANCE, refuse_non_finite
from morphc.compiler.deviation import relative_deviation
from morphc.compiler.extend import _option, resolve_width
from morphc.compiler.extended import IN_PLACE_MARK
from morphc.compiler.write import write_weights
from morphc.errors import ContractionError
from morphc.ir.branch import BypassBranch
from morphc.ir.sites import Site
from morphc.passes.fold_extension import branch_deltas

_PROBE_ROWS = 2   # rows of each site's last input kept to verify the fold


class InPlaceExtension:
    """Branches hooked onto the sites of ``model``; :meth:`fold` writes them into its weights.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> from morphc.integrations.sites import module_sites
    >>> table, modules = module_sites(model)
    >>> ext = InPlaceExtension(model, table.extendable(), modules, width=2)
    >>> x = torch.randn(3, 4); before = model(x)
    >>> ext.set_homotopy(0.0); ext.fold()      # B = 0: the fold adds nothing
    0.0
    >>> torch.equal(model(x), before), ext.removed
    (True, True)
    """

    _morphc_in_place_extension = True   # IN_PLACE_MARK: morphc.extend / Bypass refuse one

    def __init__(self, model: nn.Module, sites: list[Site], modules: dict[str, nn.Module], *,
                 width: int | float = 8, activation: str = "tanh", overrides=None,
                 seed: int = 0, init_scale: float = 1.0) -> None:
        self.model, self.sites = model, list(sites)
        self.modules = {s.name: modules[s.name] for s in self.sites}
        generator = torch.Generator().manual_seed(seed)
        weight0 = self.modules[self.sites[0].name].weight
        self._homotopy = torch.ones((), dtype=torch.float32, device=weight0.device)
        self.branches: dict[str, BypassBranch] = {}
        for site in self.sites:
            weight = self.modules[site.name].weight
            self.branches[site.name] = BypassBranch(
                site.kind, site.in_features, site.out_features,
                resolve_width(site, _option(overrides, site, "width", width)),
                _option(overrides, site, "activation", activation),
                with_bias=site.bias_foldable, homotopy=self._homotopy, conv=site.conv,
                dtype=weight.dtype, device=weight.device, generator=generator,
                init_scale=init_scale)
        self.active, self.removed = True, False
        self.probes: dict[str, torch.Tensor] = {}
        # first among the module's forward hooks: a user's hook then sees W x + branch, as it
        # will see W' x after the fold (run last, a rescaling hook would make the fold wrong)
        self._handles = [module.register_forward_hook(self._hook(name), prepend=True)
                         for name, module in self.modules.items()]

    def _hook(self, name: str):
        branch = self.branches[name]

        def add_branch(module, args, output):
            if not self.active:
                return None
            if len(args) != 1:
                raise ContractionError(
                    f"site {name!r} ({type(module).__name__}) was called with {len(args)} "
                    "positional inputs (e.g. ConvTranspose's output_size); its branch reads one. "
                    "Exclude it: exclude=[" + repr(name) + "]")
            x = args[0]
            self.probes[name] = (x[:_PROBE_ROWS] if x.dim() > 1 else x).detach()
            return output + branch(x)

        setattr(add_branch, IN_PLACE_MARK, True)   # morphc.extend / Bypass refuse a hooked model
        return add_branch

    # -- what a Cycle asks of an extension --------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for b in self.branches.values() for p in b.parameters()]

    def named_extension_parameters(self):
        for name, branch in self.branches.items():
            for pname, param in branch.named_parameters():
                yield f"{name}.{pname}", param

    def set_homotopy(self, s: float) -> None:
        if not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"homotopy must be in [0, 1], got {s}")
        with torch.no_grad():
            self._homotopy.fill_(float(s))

    @property
    def homotopy(self) -> float:
        return float(self._homotopy)

    def constraint_residual(self) -> float:
        with torch.no_grad():
            return max((float(b.constraint_residual()) for b in self.branches.values()),
                       default=0.0)

    # -- fold and removal -------------------------------------------------------------------------
    def folded_values(self) -> dict[str, torch.Tensor]:
        """Each site's weight and bias with its branch folded in (float64)."""
        values: dict[str, torch.Tensor] = {}
        for site in self.sites:
            module = self.modules[site.name]
            delta_w, delta_b = branch_deltas(site, self.branches[site.name])
            values[site.weight_name] = module.weight.detach().double() + delta_w
            if delta_b is not None:
                values[site.uses[0].bias_name] = module.bias.detach().double() + delta_b
        return values

    def fold(self) -> float:
        """Write the branches into the sites' own Parameters (on C only) and remove the hooks;
        returns the largest relative deviation of a site's output, folded vs extended, on the
        last input it saw (autocast off). Refused (weights untouched, hooks kept) when that
        exceeds the tolerance of the weights' dtype, or when a parameter is NaN/inf (training
        diverged: said as ``morphc.contract`` says it, not as a residual of nan)."""
        refuse_non_finite(self.branches, self.model)
        residual = self.constraint_residual()
        if residual != 0.0:
            raise ContractionError(f"the branches are off the constraint set (residual "
                                   f"{residual:.3g}); set the homotopy to 0 before folding")
        params = {}
        for site in self.sites:
            module = self.modules[site.name]
            params[site.weight_name] = module.weight
            if site.bias_foldable:
                params[site.uses[0].bias_name] = module.bias
        reference = self._site_outputs()
        measured: list[float] = []

        def verify() -> None:
            self.active = False
            try:
                after = self._site_outputs()
            finally:
                self.active = True
            for name, ref in reference.items():
                dtype = str(self.modules[name].weight.dtype)
                deviation = relative_deviation(ref, after[name])
                measured.append(deviation)
                if not deviation <= VERIFY_TOLERANCE.get(dtype, 1e-2):
                    raise ContractionError(f"folding site {name!r} changes its output by "
                                           f"{deviation:.3g} ({dtype}); the weights were "
                                           "restored")

        write_weights(params, self.folded_values(), verify=verify, what="folding in place")
        self.remove()
        return max(measured, default=0.0)

    def _site_outputs(self) -> dict[str, torch.Tensor]:
        """Each probed site on its last input, in the weights' dtype with autocast off."""
        outputs = {}
        for name, x in list(self.probes.items()):
            module = self.modules[name]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                outputs[name] = module(x.to(module.weight.dtype))
        return outputs

    def remove(self) -> None:
        """Take the hooks off (idempotent); the model is then exactly the user's again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.active, self.removed = [], False, True
        self.probes.clear()
