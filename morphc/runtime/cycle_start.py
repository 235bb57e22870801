"""Starting a Bypass cycle: trigger → extend.

Kept apart from the steps of a cycle (:mod:`~morphc.runtime.cycle_runner`) because everything
here happens once, before the model changes: the snapshot a fault restores, the plain-training
copy beside the cycle, the trace, the choice of sites (``sites="auto"``) and the extension joining
the optimizer — or, when any of it fails, no cycle for the rest of the run. Mixed into
:class:`~morphc.runtime.cycle_runner.CycleRunner`, whose state it reads.
"""

from __future__ import annotations

from morphc.compiler.escape import escape_scores, random_direction_probe, rank_sites
from morphc.compiler.extend import extend
from morphc.compiler.extended import converted_like, floating_dtype_device
from morphc.errors import BypassError
from morphc.ir.settings import module_settings
from morphc.ir.trace import trace
from morphc.runtime.config import Accept, OnFailure
from morphc.runtime.cycle import Cycle
from morphc.runtime.lookahead import lookahead_scores
from morphc.runtime.optimizer_group import ExtensionGroup
from morphc.runtime.shadow import Shadow
from morphc.runtime.snapshot import Snapshot, model_structure
from morphc.runtime.steps import Closure
from morphc.runtime.user_attributes import reads_user_model
from morphc.runtime.wrapping import all_reduce_mean, all_reduce_sum


class CycleStart:
    """How a Bypass cycle begins, or why none will."""

    def _start_cycle(self, closure: Closure) -> None:
        """trigger → extend: snapshot, trace (once), choose sites, extend, join the optimizer."""
        if not self._judge_replays(closure):
            return
        snapshot = Snapshot.take(self._user_model, self.optimizer)
        shadow = self._take_shadow() if self._keeps_shadow() else None
        try:
            self._trace()
            sites, scores = self._choose_sites(closure)
            ext = self._extend(sites)
        except Exception as exc:
            self._give_up(f"extension failed: {type(exc).__name__}: {exc}",
                          f"morphc could not extend the model ({exc}); nothing was changed. "
                          "Choose other sites=", exc)
            return
        if scores is not None:
            ext.extension_config.escape_scores, ext.extension_config.selection = scores, "auto"
        group = ExtensionGroup(self.optimizer, list(ext.extension_parameters()),
                               self.config.extension_options)
        pace = getattr(self.trigger, "pace", None)
        self._cycle = Cycle(ext, snapshot, group, self.config, started_at=self.step_count,
                            pace=pace() if callable(pace) else 0.0)
        self._cycle.shadow = shadow
        self._cycle.structure = self._traced_structure
        self._cycle.watch_settings(self._user_model)
        self._module = None
        chosen = ext.extension_config
        self._event("extend", sites=chosen.sites, widths=chosen.widths, scores=scores)

    def _keeps_shadow(self) -> bool:
        """Plain training beside the cycle (:mod:`~morphc.runtime.shadow`) whenever a verdict
        can hand it over: not with ``accept="always"`` (no verdict), not across processes (the
        copy would train without the all-reduce)."""
        return self.config.shadow and self.config.accept != Accept.ALWAYS and \
            not self.distributed

    def _take_shadow(self) -> Shadow | None:
        """The copy, or None when the model or optimizer cannot be deep-copied (a handle or a
        lock among its attributes): then a miss restores the state from before the cycle."""
        try:
            return Shadow(self._user_model, self.optimizer, self.wrapping.around_copy)
        except Exception as exc:
            self.config.shadow = False               # it would fail the same way next time
            self._warn(f"morphc.Bypass could not copy the model and optimizer to train plainly "
                       f"beside its cycles ({type(exc).__name__}: {exc}); a cycle that does not "
                       "pay restores the state from before it instead (its steps are lost)")
            return None

    def _give_up(self, reason: str, advice: str, exc: BaseException | None = None) -> None:
        """No cycle for the rest of the run: recorded, warned once, or raised as a BypassError
        with ``on_failure="raise"``. Called before anything changed."""
        self._disabled = reason
        self._event("failure", reason=reason)
        if self.config.on_failure is OnFailure.RAISE:
            raise BypassError(f"{advice}, or pass on_failure='rollback' to train on without "
                              "Bypass.") from exc
        self._warn(f"morphc.Bypass trains on without cycles: {reason}. {advice}.")

    def _trace(self) -> None:
        """Trace once per run (and trace() caches per model): a cycle never re-exports —
        unless the model was converted (``model.double()``, ``.to(device)``) since its inputs
        were recorded (they are converted the same way and the model traced again), or the user
        replaced or added a layer since the trace (a stale graph would train the old layers) or
        changed a layer's setting (torch.export baked the old ``Dropout.p`` into the graph)."""
        now = floating_dtype_device(self._user_model)
        if self._inputs_as is not None and now is not None and now != self._inputs_as:
            self.example_inputs, self.example_kwargs = converted_like(
                (tuple(self.example_inputs), dict(self.example_kwargs or {})),
                self._inputs_as, now)
            self._inputs_as, self._traced = now, None
        structure, settings = model_structure(self._user_model), module_settings(self._user_model)
        if self._traced is None or structure != self._traced_structure or \
                settings != self._traced_settings:
            self._traced = trace(self._user_model, self.example_inputs,
                                 kwargs=self.example_kwargs or None,
                                 dynamic_shapes=self.config.dynamic_shapes)
            self._traced_structure, self._traced_settings = structure, settings

    def _choose_sites(self, closure: Closure):
        """Resolve ``sites``. ``"auto"``: rank by a short joint look-ahead per site, scored on
        ``probe`` (default: ``eval_closure`` or the closure) — what survives at s = 0; with
        ``probe=None``, by ``‖∂L/∂B‖`` along a random output direction (no training). Scores
        are agreed across ranks."""
        spec = self.config.sites
        if not (isinstance(spec, str) and spec == "auto"):
            return spec, None
        full = self._extend("all")
        names = list(full.extension_config.sites)
        probe = self.config.probe
        if probe is None:
            scores = escape_scores(full, random_direction_probe(self.example_inputs,
                                                                self.config.seed))
            if self.distributed:
                scores = dict(zip(scores, all_reduce_sum(list(scores.values())), strict=True))
            return rank_sites(scores, self.config.top_k), scores
        if probe == "closure":
            probe = self.config.eval_closure or closure
        options = {"lr": self._lr_scale * self._peak_lr, **self.config.extension_options}
        device = next(self._user_model.parameters()).device
        scores = lookahead_scores(
            lambda name: self._extend([name]), names, self.optimizer, self._user_model,
            closure, lambda m: self._loss_without_trace(probe, m, reduce=False),
            steps=self.config.lookahead_steps, group_options=options,
            reduce=(lambda v: all_reduce_mean(v, device)) if self.distributed else float)
        return rank_sites(scores, self.config.top_k), scores

    def _extend(self, sites):
        cfg = self.config
        if isinstance(sites, list):   # exact names: never let a name act as a suffix / regex
            wanted = set(sites)
            sites = lambda site: site.name in wanted  # noqa: E731
        return reads_user_model(extend(
            self._user_model, self.example_inputs, sites=sites, width=cfg.width,
            activation=cfg.activation, exclude=cfg.exclude, overrides=cfg.overrides,
            seed=cfg.seed + self.cycle + self.failures, init_scale=cfg.init_scale,
            traced=self._traced))
