"""Hypothesis strategies for nasty JSON values, shared by the property tests: type drift,
nesting (15-60 levels deep too), integers beyond 64 bits, unicode, nulls."""

from __future__ import annotations

from hypothesis import strategies as st

BIG = st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), BIG,
                    st.floats(allow_nan=False, allow_infinity=False, width=64), TEXT)


def _deep(n: int, leaf):
    for _ in range(n):
        leaf = [leaf]
    return leaf


def values(keys: list[str], max_leaves: int = 8):
    """Scalars, lists and objects (keys from `keys`) nested at random, or 15-60 deep."""
    return st.one_of(
        st.recursive(SCALARS, lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from(keys), inner, max_size=3)),
            max_leaves=max_leaves),
        st.builds(_deep, st.integers(15, 60), SCALARS))
