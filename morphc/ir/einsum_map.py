"""When an ``einsum`` against a 2-D parameter is a linear map a site kind already handles.

A bypass branch reads one input ``x`` and must produce the operator's output layout, so an
equation is a site only when it is, index for index, one of the existing kinds::

    "...i,oi->...o"  "bsd,fd->bsf"     linear        (W is (out, in): x Wᵀ on the last axis)
    "bij,jk->bik"    "bsd,df->bsf"     matmul_right  (P is (in, out): x P on the last axis)
    "oi,bin->bon"                      matmul_left   (W is (out, in): W x on axis −2)

(the parameter may be either operand; a transposed ``W.t()`` operand swaps its indices). Then
branch, fold and save/load are those of the kind, unchanged. Every other equation — more than two
operands, a repeated index, a sum over another axis of ``x``, an output order the kinds do not
produce — is a :class:`str` saying why, for the site table's exclusions.
"""

from __future__ import annotations

from dataclasses import dataclass

_ELLIPSIS = "…"


@dataclass(frozen=True)
class EinsumMap:
    """The site kind an equation maps onto and which operand the branch reads."""

    kind: str
    input_operand: int          # index of ``x`` among the einsum's operands


def _terms(equation: str) -> tuple[list[list[str]], list[str]] | str:
    text = equation.replace(" ", "").replace("...", _ELLIPSIS)
    lhs, arrow, rhs = text.partition("->")
    terms = [list(t) for t in lhs.split(",")]
    bad = set(text) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,->" + _ELLIPSIS)
    if bad or not all(terms):
        return f"equation {equation!r} is not one morphc can read"
    if not arrow:              # implicit output: ellipsis first, then indices seen once, sorted
        flat = [i for t in terms for i in t if i != _ELLIPSIS]
        rhs = (_ELLIPSIS if _ELLIPSIS in lhs else "") + \
            "".join(sorted(i for i in set(flat) if flat.count(i) == 1))
    return terms, list(rhs)


def einsum_map(equation: str, param: int, transposed: bool = False) -> EinsumMap | str:
    """Map ``einsum(equation, ...)`` whose operand ``param`` is a 2-D parameter onto a site
    kind, or say why it is not one (``transposed``: the operand is ``W.t()``)."""
    parsed = _terms(equation)
    if isinstance(parsed, str):
        return parsed
    terms, out = parsed
    if len(terms) != 2:
        return f"einsum of {len(terms)} operands: a site is one input times one weight"
    w, x = terms[param], terms[1 - param]
    if transposed:
        w = w[::-1]
    if len(w) != 2 or _ELLIPSIS in w or w[0] == w[1]:
        return f"the parameter's indices {''.join(w)!r} are not two distinct axes"
    shared = [i for i in w if i in x]
    if len(shared) != 1 or len(set(x)) != len(x) or len(set(out)) != len(out):
        return ("a site contracts exactly one axis of the input with the parameter, without "
                "repeated indices")
    c = shared[0]
    f = w[0] if w[1] == c else w[1]
    if c in out or f not in out or any(i not in out for i in x if i != c):
        return "the equation sums over an axis other than the contracted one"
    if x[-1] == c and out == [*x[:-1], f]:
        return EinsumMap("linear" if w == [f, c] else "matmul_right", 1 - param)
    if len(x) >= 2 and _ELLIPSIS not in x[-2:] and x[-2] == c and out == [*x[:-2], f, x[-1]] \
            and w == [f, c]:
        return EinsumMap("matmul_left", 1 - param)
    return ("the output order is not one a site kind produces (the parameter's free axis last, "
            "replacing the input's last axis; or W x on axis -2)")
