"""``morphc.contract``: fold every branch into the user's own Parameters, exactly (C1)."""

from __future__ import annotations

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
    changed = [name for site in ext.sites for name in
               [site.weight_name, *(u.bias_name for u in site.uses if u.bias_name)]
               if user.get(name) is not graph.get_parameter(name)]
    if changed:
        raise ContractionError(
            f"the user's model changed after morphc.extend: {sorted(set(changed))} are no longer "
            "the Parameters the extension was built on (a submodule was replaced or a Parameter "
            "reassigned), so folding would write into orphaned tensors. Nothing was changed; "
            "extend the model again after changing it.")


def contract(ext: ExtendedModel, *, force: bool = False, verify: bool = True) -> nn.Module:
    """Fold every branch into the user's own Parameters, in place; return the user's model.

    Requires the branches to sit on the constraint set C (``ext.set_homotopy(0.0)`` or the
    Bypass return phase); ``force=True`` snaps onto C and reports the function change that caused
    in ``ext.contraction_report.snap_change``. All-or-nothing: on any failure the user's weights
    are untouched (``morphc.compiler.write``).
    """
    if not isinstance(ext, ExtendedModel):
        raise ContractionError(f"contract needs what morphc.extend returned, got "
                               f"{type(ext).__name__}")
    if ext.contracted:
        raise ContractionError("this extended model was already contracted")
    check_owner(ext)
    inputs, kwargs = ext.traced.example_inputs, ext.traced.example_kwargs
    residual = ext.constraint_residual()
    snap_change = None
    if residual != 0.0:
        if not force:
            raise ContractionError(
                f"the branches are off the constraint set (residual {residual:.3g}), so folding "
                "would change the function. Reach C first: ext.set_homotopy(0.0) (or let the "
                "Bypass return phase anneal it), or pass force=True to snap and measure.")
        before = deterministic_forward(ext, inputs, kwargs=kwargs)
        ext.set_homotopy(0.0)
        snap_change = relative_deviation(before, deterministic_forward(ext, inputs, guard=ext,
                                                                      kwargs=kwargs))
    folded = ext.pipeline.fork()
    new_values = folded.run(fold_extension, ext.sites, ext.branches).analysis
    params = {name: ext.graph_module.get_parameter(name) for name in new_values}
    measured: list[float] = []

    def check() -> None:
        deviation = relative_deviation(reference, deterministic_forward(
            folded.graph_module, inputs, guard=ext, kwargs=kwargs))
        measured.append(deviation)
        tolerance = VERIFY_TOLERANCE.get(str(next(iter(params.values())).dtype), 1e-2)
        if not deviation <= tolerance:
            raise ContractionError(
                f"the folded model deviates from the extended one by {deviation:.3g} "
                f"(> {tolerance:g}); the weights were restored. In float32/16 an ill-conditioned "
                "model can do this through rounding alone: compare in float64 (model.double() "
                "before extend); if float64 deviates too, it is a morphc bug: please report it.")

    reference = deterministic_forward(ext, inputs, kwargs=kwargs) if verify else None
    write_weights(params, new_values, verify=check if verify else None)
    ext.mark_contracted(ContractionReport(list(new_values), measured[0] if measured else None,
                                          snap_change, residual), folded.graph_module)
    return ext.model
