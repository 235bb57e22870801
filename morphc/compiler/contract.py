"""``morphc.contract``: fold every branch into the user's own Parameters, exactly (C1)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from morphc.compiler.deviation import deterministic_forward, relative_deviation
from morphc.compiler.extended import ContractionReport, ExtendedModel
from morphc.compiler.write import write_weights
from morphc.errors import ContractionError
from morphc.passes.fold_extension import fold_extension

# A safety net against bugs, not the C1 target (≤ 1e-6 f32 / 1e-12 f64, measured in the tests).
VERIFY_TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-4, "torch.bfloat16": 5e-2,
                    "torch.float16": 5e-2}


def check_owner(ext: ExtendedModel) -> None:
    """The graph must still hold the user's own tensors, by qualified name: a submodule the user
    replaced after ``extend`` would make the fold write into orphaned Parameters."""
    user = {**dict(ext.model.named_parameters(remove_duplicate=False)),
            **dict(ext.model.named_buffers(remove_duplicate=False))}
    graph = ext.graph_module
    changed = [name for site in ext.extension_sites for name in
               [site.weight_name, *(u.bias_name for u in site.uses if u.bias_name)]
               if user.get(name) is not graph.get_parameter(name)]
    if changed:
        raise ContractionError(
            f"the user's model changed after morphc.extend: {sorted(set(changed))} are no longer "
            "the Parameters the extension was built on (a submodule was replaced or a Parameter "
            "reassigned), so folding would write into orphaned tensors. Nothing was changed; "
            "extend the model again after changing it.")


def check_device(ext: ExtendedModel) -> None:
    """Folding needs values: a model on the meta device has none."""
    if any(t.device.type == "meta" for t in [*ext.parameters(), *ext.buffers()]):
        raise ContractionError(
            "the extended model is on the meta device, so there are no values to fold or to "
            "verify; materialise it first (ext.to_empty(device='cpu') and load the weights), "
            "then contract.")


def float64_deviation(ext: ExtendedModel) -> float | None:
    """The same fold, checked the same way, on a float64 copy: tells rounding in a low-precision
    model apart from a wrong fold. None when it cannot be measured."""
    try:
        work = copy.deepcopy(ext).double()
        inputs, kwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.double() if t.is_floating_point() else t,
            work.example_call())
        reference = deterministic_forward(work, inputs, kwargs=kwargs)
        folded = work.extension_pipeline.fork()
        new_values = folded.run(fold_extension, work.extension_sites,
                                work.extension_branches).analysis
        with torch.no_grad():
            for name, value in new_values.items():
                work.graph_module.get_parameter(name).copy_(value)
        return relative_deviation(reference, deterministic_forward(
            folded.graph_module, inputs, guard=work, kwargs=kwargs))
    except Exception:   # noqa: BLE001 - a diagnostic only; the refusal stands either way
        return None


def _global_hooks() -> int:
    """How many hooks ``nn.modules.module.register_module_forward_hook`` (and its pre-hook and
    full-backward kin) installed: they run on every module, the branches included."""
    from torch.nn.modules import module
    return sum(len(getattr(module, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _deviation_advice(ext: ExtendedModel, dtype: torch.dtype) -> str:
    if _global_hooks():
        return (f"{_global_hooks()} global module hook(s) are registered "
                "(torch.nn.modules.module.register_module_forward_hook or kin): they run on "
                "every module, the branches and the folded graph included, so a hook that "
                "changes outputs changes the two differently. Remove them around extend and "
                "contract.")
    if dtype == torch.float64:
        return "In float64 this means the fold itself is wrong: a morphc bug, please report it."
    d64 = float64_deviation(ext)
    if d64 is None:
        return ("The same fold could not be measured in float64 here; compare yourself "
                "(model.double() before extend).")
    if d64 <= VERIFY_TOLERANCE["torch.float64"]:
        return (f"The same fold in float64 deviates by only {d64:.3g}, so this is rounding in "
                f"{dtype} (an ill-conditioned model), not a wrong fold: contract in float64 "
                "(model.double() before extend), or pass verify=False to accept the rounding.")
    return (f"The same fold in float64 deviates by {d64:.3g} too, so the fold itself is wrong: "
            "a morphc bug, please report it with the model.")


def _tolerance(dtype: torch.dtype) -> float:
    return VERIFY_TOLERANCE.get(str(dtype), 1e-2)


def _coarsest_dtype(tensors) -> torch.dtype:
    """The least precise floating dtype among the folded weights and the outputs: a float64
    layer feeding a float32 head (or a float32 model returning float16) is only as exact as
    its coarsest part, so the check tolerates that part's rounding."""
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes or {torch.float32}, key=_tolerance)


def _adds_nothing(ext: ExtendedModel) -> bool:
    """Every branch's output map is zero: the branches add nothing, whatever their α."""
    return all(not bool(torch.any(branch.B != 0)) for branch in ext.extension_branches.values())


def diverged(branches: Mapping[str, nn.Module], model: nn.Module) -> str | None:
    """Which parameters of the branches or of the model they extend are NaN/inf — a diverged
    run, not a branch off C (the residual of a NaN α read "off the constraint set (residual
    nan)" and asked for set_homotopy(0.0)) — and why it happens; None when every one is finite.
    Shared by ``morphc.contract`` and the trainer integrations' in-place fold."""
    named = [*((f"branch {site}.{n}", p) for site, branch in branches.items()
               for n, p in branch.named_parameters()), *model.named_parameters()]
    bad = [(n, p) for n, p in named if not bool(torch.isfinite(p).all())]
    if not bad:
        return None
    names = ", ".join(n for n, _ in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4
                                                else "")
    half = any(p.dtype == torch.float16 for _, p in bad)
    return (f"parameters are not finite (NaN/inf): {names}. Training diverged, and nothing "
            "non-finite folds exactly"
            + (" — in float16, Adam's default eps=1e-8 rounds to 0, and at B = 0 the branch's A "
               "and α have zero gradient, so their first Adam step is 0/0 = NaN: pass eps=1e-4 "
               "(or more), or train in float32 with torch.autocast" if half else ""))


def refuse_non_finite(branches: Mapping[str, nn.Module], model: nn.Module) -> None:
    """:func:`diverged` as a ``ContractionError``, before anything is written."""
    why = diverged(branches, model)
    if why is not None:
        raise ContractionError(f"{why}. Nothing was written; restore a checkpoint or extend "
                               "again, with a lower learning rate.")


def contract(ext: ExtendedModel, *, force: bool = False, verify: bool = True) -> nn.Module:
    """Fold every branch into the user's own Parameters, in place; return the user's model.

    Requires the branches to sit on the constraint set C (``ext.set_homotopy(0.0)`` or the
    Bypass return phase); ``force=True`` snaps onto C and reports the function change that caused
    in ``ext.contraction_report.snap_change``. Branches that never moved (every ``B = 0``, as
    ``extend`` makes them) add nothing at any homotopy, so they reach C unasked:
    ``contract(extend(model, args))`` is the identity. All-or-nothing: on any failure the user's
    weights are untouched (``morphc.compiler.write``).
    """
    if not isinstance(ext, ExtendedModel):
        raise ContractionError(f"contract needs what morphc.extend returned, got "
                               f"{type(ext).__name__}")
    if ext.contracted:
        raise ContractionError("this extended model was already contracted")
    check_owner(ext)
    check_device(ext)
    refuse_non_finite(ext.extension_branches, ext.model)
    inputs, kwargs = ext.example_call()
    residual = ext.constraint_residual()
    snap_change = None
    if residual != 0.0:
        if not force and not _adds_nothing(ext):
            raise ContractionError(
                f"the branches are off the constraint set (residual {residual:.3g}), so folding "
                "would change the function. Reach C first: ext.set_homotopy(0.0) (or let the "
                "Bypass return phase anneal it), or pass force=True to snap and measure.")
        before = deterministic_forward(ext, inputs, kwargs=kwargs)
        ext.set_homotopy(0.0)
        snap_change = relative_deviation(before, deterministic_forward(ext, inputs, guard=ext,
                                                                      kwargs=kwargs))
    folded = ext.extension_pipeline.fork()
    new_values = folded.run(fold_extension, ext.extension_sites, ext.extension_branches).analysis
    params = {name: ext.graph_module.get_parameter(name) for name in new_values}
    measured: list[float] = []

    def check() -> None:
        deviation = relative_deviation(reference, deterministic_forward(
            folded.graph_module, inputs, guard=ext, kwargs=kwargs))
        measured.append(deviation)
        dtype = _coarsest_dtype([*params.values(), *torch.utils._pytree.tree_leaves(reference)])
        tolerance = _tolerance(dtype)
        if not deviation <= tolerance:
            raise ContractionError(
                f"the folded model deviates from the extended one by {deviation:.3g} "
                f"(> {tolerance:g}); the weights were restored. "
                + _deviation_advice(ext, dtype))

    # the graph the fold rewrites, not ext(...): in the other mode an exported extension runs
    # a second graph, whose dropout and BatchNorm differ from this one's
    reference = deterministic_forward(ext.graph_module, inputs, guard=ext, kwargs=kwargs) \
        if verify else None
    write_weights(params, new_values, verify=check if verify else None)
    ext.mark_contracted(ContractionReport(list(new_values), measured[0] if measured else None,
                                          snap_change, residual), folded.graph_module)
    return ext.model
