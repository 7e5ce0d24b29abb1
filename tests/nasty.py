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


# ------------------------------------------------------------------ hostile checkpoint files

# Globals a hostile pickle names to run code, as (module, name): plain ones, dotted names
# under modules nfb's DCP unpickler knows (protocol 4 follows dots), and Python 2 spellings.
HOSTILE_GLOBALS = st.sampled_from([
    ("os", "system"), ("posix", "system"), ("subprocess", "getoutput"),
    ("builtins", "exec"), ("builtins", "eval"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("__builtin__", "eval"), ("nt", "system"),
    ("torch.distributed.checkpoint.filesystem", "os.system"),
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.filesystem", "pickle.loads"),
    ("torch.distributed.checkpoint.state_dict_loader", "os.system"),
    ("torch", "serialization.os.system"), ("torch", "_utils.os.system"),
    ("torch.serialization", "os.system"), ("torch.serialization", "_get_layout.__globals__"),
    ("pathlib", "os.system"), ("collections", "OrderedDict.__init__.__globals__"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch", "load"), ("numpy", "load"),
])

# Values a hostile `.zarray` puts in each field: huge, negative, wrong types, escapes.
_ZARRAY_BAD = {
    "shape": st.one_of(
        st.lists(st.integers(-3, 2 ** 70), max_size=9), st.just([2 ** 40, 128]),
        st.just([2, 10 ** 15, 128]), st.just(["2", 512, 128]), st.just([True, 128]),
        st.just(None), st.just({"0": 1})),
    "chunks": st.one_of(
        st.lists(st.integers(-3, 2 ** 70), max_size=9), st.just([10 ** 12] * 3),
        st.just([0, 1, 1]), st.just([1, 1, 1]), st.just(None), st.just([1.5, 64, 128])),
    "dtype": st.sampled_from(["|O", "<i8", "<V2", ">f4", "|b1", "<c16", "", None, ["bfloat16"],
                              {"bfloat16": 1}, "bfloat16\0", "float32"]),
    "dimension_separator": st.sampled_from(["../", "/..", "/../../", "", "\\", "..", "0",
                                            "/", ".", None, 5, ["."]]),
    "compressor": st.sampled_from([{"id": "blosc"}, {"id": "zlib", "level": 1}, "zstd", 0, []]),
    "filters": st.sampled_from([[{"id": "delta"}], "x", 1]),
    "order": st.sampled_from(["F", "c", None, 1]),
    "zarr_format": st.sampled_from([3, "2", None, 2.0]),
}


def zarray_mutations():
    """(field, value) pairs that a hostile `.zarray` may hold in place of Megatron's."""
    return st.one_of(*(st.tuples(st.just(k), v) for k, v in _ZARRAY_BAD.items()))
