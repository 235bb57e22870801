"""The site table: which linear operators in a graph can carry a bypass branch.

A *site* is one weight Parameter of the user's model used as the weight of linear operators
(``linear``, ``convNd``, ``matmul`` against a parameter). A weight used at several graph nodes
(tied weights) is one site with several ``node_names``: they share one branch, so the fold stays
consistent.
"""

from __future__ import annotations

import re
import re._constants as sre_constants
import re._parser as sre_parse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from morphc.errors import SiteError


@dataclass
class ConvConfig:
    """Hyper-parameters a bypass conv must copy so its output grid matches the site's."""

    dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False     # conv_transposeNd: weight (in, out/groups, k...)
    output_padding: tuple[int, ...] = ()


@dataclass
class SiteUse:
    """One graph node that uses the site's weight."""

    node: str
    op: str                      # e.g. "nn.Linear", "F.linear", "aten.conv2d", "matmul"
    input_arg: int               # index of the node argument the branch reads
    bias_name: str | None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    bias_rows: tuple[int, int] | None = None   # the bias is rows [start, stop) of bias_name


@dataclass
class Site:
    """A weight parameter that can be extended, and everything a branch needs to know about it."""

    name: str
    kind: str                    # "linear" | "conv" | "matmul_right" | "matmul_left"
    weight_name: str
    in_features: int
    out_features: int
    uses: list[SiteUse] = field(default_factory=list)
    conv: ConvConfig | None = None
    excluded: str | None = None  # why this weight cannot be extended (e.g. used elsewhere)
    bias_foldable: bool = True   # False: some use has no bias, or a bias is used elsewhere
    rows: tuple[int, int] | None = None     # the operator uses rows [start, stop) of the weight
    # weight_norm: the operator's weight is g·v/‖v‖ with v = weight_name; (g's name, dim)
    weight_norm: tuple[str, int] | None = None

    @property
    def node_names(self) -> list[str]:
        return [u.node for u in self.uses]

    @property
    def groups(self) -> int:
        return self.conv.groups if self.conv else 1

    @property
    def tied(self) -> bool:
        return len(self.uses) > 1

    def to_dict(self) -> dict:
        return asdict(self)


class SiteTable(dict[str, Site]):
    """Sites by name, in graph order. ``exclusions`` maps each linear-operator weight that is
    not a site at all (fused RNN, bilinear, computed weights, ...) to the reason."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exclusions: dict[str, str] = {}

    def extendable(self) -> list[Site]:
        return [s for s in self.values() if s.excluded is None]

    def covered(self) -> set[str]:
        """Every parameter the table speaks for: site weights (and weight-norm gains) and
        excluded linear-operator weights."""
        names = set(self.exclusions)
        for site in self.values():
            names.add(site.weight_name)
            if site.weight_name and site.weight_norm:
                names.add(site.weight_norm[0])
        return names

    def explain(self) -> str:
        """What was found and why each was excluded (for errors)."""
        found = [f"{s.name} ({s.kind}): " + (f"excluded: {s.excluded}" if s.excluded else "ok")
                 for s in self.values()]
        found += [f"{name}: excluded: {why}" for name, why in self.exclusions.items()]
        return "; ".join(found) if found else (
            "no nn.Linear / convNd / conv-transpose / F.linear / addmm / matmul / einsum / "
            "bmm against a parameter in the graph")

    def describe(self) -> str:
        return ", ".join(self) or "(none)"


SiteSpec = str | Iterable[str] | Callable[[Site], bool]


_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def _risky(items, inside_repeat: bool) -> str | None:
    """What in a parsed regex can backtrack exponentially: a repeat or an alternation inside a
    repeat (``(a+)+``, ``(a|aa)*``), or a backreference."""
    for op, av in items:
        if op == sre_constants.GROUPREF:
            return "a backreference"
        if op in _REPEATS:
            if inside_repeat:
                return "a quantifier inside a quantified group"
            found = _risky(av[2], av[1] > 1)
        elif op == sre_constants.BRANCH:
            if inside_repeat:
                return "an alternation inside a quantified group"
            found = next(filter(None, (_risky(b, inside_repeat) for b in av[1])), None)
        elif op == sre_constants.SUBPATTERN:
            found = _risky(av[3], inside_repeat)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            found = _risky(av[1], inside_repeat)
        else:
            found = None
        if found:
            return found
    return None


def safe_pattern(pattern: str) -> re.Pattern | None:
    """The compiled full-match regex of a site pattern, or None if it is not a regex.

    Site patterns are matched against every parameter name, so a regex that can backtrack
    exponentially would hang ``extend``: one with a quantifier or alternation inside a quantified
    group, or a backreference, is refused with ``SiteError`` (write ``layers\\.\\d+\\.fc``,
    not ``(layers\\.\\d+)+``).
    """
    try:
        parsed = sre_parse.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None
    reason = _risky(parsed.data, False)
    if reason:
        raise SiteError(f"site pattern {pattern!r} has {reason}, which can take exponential "
                        "time to match; allowed: exact names, '.suffix' names, and full-match "
                        "regexes without nested quantifiers, quantified alternations or "
                        r"backreferences (e.g. r'layers\.\d+\.linear1')")
    return compiled


def _matches(pattern: str, site: Site) -> bool:
    """PEFT-style matching: exact name, weight name, a ``.suffix`` match, or a full-match regex
    (checked by :func:`safe_pattern`)."""
    names = (site.name, site.weight_name)
    if pattern in names or any(n.endswith("." + pattern) for n in names):
        return True
    compiled = safe_pattern(pattern)
    return compiled is not None and any(compiled.fullmatch(n) for n in names)


def _names(pattern: str, site: Site) -> bool:
    """The pattern names this site: its name, weight name, or a ``.suffix`` of either."""
    names = (site.name, site.weight_name)
    return pattern in names or any(n.endswith("." + pattern) for n in names)


def site_patterns(spec, what: str = "sites") -> list[str]:
    """A name/pattern or an iterable of them, as a list of strings; anything else is a
    ``SiteError`` saying what is accepted."""
    patterns = [spec] if isinstance(spec, str) else \
        list(spec) if isinstance(spec, Iterable) and not isinstance(spec, bytes) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise SiteError(f"{what}= takes 'all', 'auto', a site name / '.suffix' / full-match "
                        "regex, a list of those, or a predicate (Site) -> bool; got "
                        f"{spec!r}")
    return patterns


def select_sites(table: SiteTable, sites: SiteSpec, exclude: Iterable[str] = (),
                 frozen: Iterable[str] = ()) -> list[Site]:
    """Resolve a user's site choice to a list of sites; no match is an error listing what exists.

    ``sites`` is ``"all"``, one name/pattern, a list of names/patterns, or a predicate
    ``(Site) -> bool``. (``"auto"`` is resolved by the caller from escape scores.)

    ``frozen``: weight names with ``requires_grad=False``. A frozen weight is not a site unless
    the user names it (its name, weight name or ``.suffix``): ``"all"``, regexes and predicates
    skip it, so fine-tuning with frozen layers never changes them.
    """
    frozen = set(frozen)
    candidates = table.extendable()
    if sites == "all":
        chosen = [s for s in candidates if s.weight_name not in frozen]
    elif callable(sites):
        chosen = [s for s in candidates if s.weight_name not in frozen and sites(s)]
    else:
        patterns = site_patterns(sites)
        chosen = []
        for pattern in patterns:
            hits = [s for s in candidates if _names(pattern, s) or
                    (s.weight_name not in frozen and _matches(pattern, s))]
            if not hits:
                blocked = [s for s in table.values() if s.excluded and _matches(pattern, s)]
                if blocked:
                    raise SiteError(f"site {pattern!r} cannot be extended: {blocked[0].excluded}")
                inside = [n for n in table.exclusions
                          if n == pattern or n.startswith(f"{pattern}.")]
                if inside:
                    raise SiteError(f"site {pattern!r} cannot be extended: {inside[0]} is not a "
                                    f"site: {table.exclusions[inside[0]]}")
                if any(_matches(pattern, s) for s in candidates):
                    raise SiteError(f"{pattern!r} only matches frozen (requires_grad=False) "
                                    "weights, which a pattern does not select; name them "
                                    "exactly to extend them")
                raise SiteError(
                    f"no site matches {pattern!r}; sites in this model: {table.describe()}"
                )
            chosen.extend(h for h in hits if h not in chosen)
    excluded = site_patterns(exclude, "exclude")
    chosen = [s for s in chosen if not any(_matches(p, s) for p in excluded)]
    if not chosen:
        skipped = sorted(s.name for s in candidates if s.weight_name in frozen)
        raise SiteError(
            f"the site selection {sites!r} (exclude={excluded}) left no site to extend; "
            f"sites in this model: {table.describe()}"
            + (f"; frozen (requires_grad=False) sites are only extended when named: {skipped}"
               if skipped else "")
        )
    return chosen


def input_of(node, index: int):
    """The argument of a site node that its branch reads (positional, or the ``input`` /
    ``other`` keyword). ``einsum(equation, [a, b])`` counts its operands as positional
    arguments after the equation, as in ``einsum(equation, a, b)``."""
    args = node.args
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], list | tuple):
        args = (args[0], *args[1])
    if len(args) > index:
        return args[index]
    return node.kwargs.get("input", node.kwargs.get("other"))
