"""The C++ op uses only names the public PopART / PopLibs 3.4 headers declare (../shared/popart_poplibs_api.json),
PopSparse calls have an arity one of the recorded signatures accepts, and the README lists the poplar:: names."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "popart_ops"
API = ROOT.parent / "shared" / "popart_poplibs_api.json"
CHECKED = ("popart", "popsparse", "popops", "poputil", "poplin")
QUALIFIED = re.compile(r"\b((?:%s)(?:::~?\w+)+)" % "|".join(CHECKED))


@pytest.fixture(scope="module")
def api():
    if not API.exists():
        pytest.fail(f"{API} is missing (the shared API list the C++ names are checked against)")
    return json.loads(API.read_text())["names"]


def sources():
    files = sorted(p for p in OPS.rglob("*") if p.suffix in (".cpp", ".hpp", ".h", ".cc"))
    assert files, f"no C++ sources under {OPS}"
    return files


def strip_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    code = re.sub(r"//[^\n]*", " ", code)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', code)  # string contents are not names


def qualified_names(code: str):
    """Every popart::/popsparse::/popops::/poputil::/poplin:: qualified name (template arguments
    dropped), plus the types named by `using` declarations and aliases."""
    code = strip_comments(code)
    names = set(QUALIFIED.findall(code))
    for m in re.finditer(r"\busing\s+(?:namespace\s+)?(?:\w+\s*=\s*)?((?:\w+::)+\w+)", code):
        names.add(m.group(1))
    return names


def unknown_names(code: str, api) -> list:
    out = []
    for name in sorted(qualified_names(code)):
        if name.split("::")[0] not in CHECKED:
            continue
        if name not in api:
            out.append(name)
    return out


def split_args(text: str) -> list:
    """Top-level comma-separated arguments of a call (brackets of every kind nest)."""
    depth, cur, out = 0, "", []
    for ch in text:
        if ch in "([{<" and not (ch == "<" and not re.search(r"\w$", cur)):
            depth += 1
        elif ch in ")]}>" and depth > 0 and not (ch == ">" and cur.endswith("-")):
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def call_args(code: str, start: int) -> str:
    """The text between the '(' at ``start`` and its matching ')'."""
    depth = 0
    for i in range(start, len(code)):
        if code[i] == "(":
            depth += 1
        elif code[i] == ")":
            depth -= 1
            if depth == 0:
                return code[start + 1:i]
    raise AssertionError("unbalanced parentheses")


def arity_range(signature: str):
    """(required, maximum) parameters of a ctags signature such as "(a,b=1)"."""
    params = split_args(signature.split("(", 1)[1].rsplit(")", 1)[0])
    params = [p for p in params if p and p != "void"]
    return sum(1 for p in params if "=" not in p), len(params)


def popsparse_calls(code: str):
    """(qualified function or constructor, number of arguments) for every PopSparse call:
    ``ns::f<T>(...)``, declarations ``ns::T<U> name(...)`` and ``std::make_unique<ns::T>(...)``."""
    code = strip_comments(code)
    calls = []
    for m in re.finditer(r"\b(popsparse(?:::\w+)+)\s*(<[^;(){}]*?>)?\s*(\w+\s*)?\(", code):
        name, var = m.group(1), m.group(3)
        callee = f"{name}::{name.rsplit('::', 1)[1]}" if var else name  # a declaration calls the constructor
        calls.append((callee, len(split_args(call_args(code, m.end() - 1)))))
    for m in re.finditer(r"make_unique<\s*((?:popsparse::)?(?:\w+::)*\w+)\s*>\s*\(", code):
        name = m.group(1)
        aliases = dict(re.findall(r"using\s+(\w+)\s*=\s*((?:\w+::)+\w+)\s*;", code))
        name = aliases.get(name, name)
        if name.startswith("popsparse::"):
            calls.append((f"{name}::{name.rsplit('::', 1)[1]}", len(split_args(call_args(code, m.end() - 1)))))
    return calls


def arity_errors(code: str, api) -> list:
    out = []
    for callee, n in popsparse_calls(code):
        sigs = [s for s in api.get(callee, []) if "(" in s]
        if not sigs:
            out.append(f"{callee}: no recorded signature")
            continue
        if not any(lo <= n <= hi for lo, hi in map(arity_range, sigs)):
            out.append(f"{callee} called with {n} arguments; recorded: {sigs}")
    return out


def test_every_checked_name_is_declared_in_the_public_headers(api):
    for path in sources():
        code = path.read_text()
        names = qualified_names(code)
        assert any(n.startswith("popsparse::static_::") for n in names)  # the extraction sees the op's calls
        assert unknown_names(code, api) == [], f"{path.name} uses names no public PopART/PopLibs 3.4 header declares"


def test_popsparse_calls_match_recorded_arities(api):
    code = (OPS / "sparse_matmul.cpp").read_text()
    calls = dict(popsparse_calls(code))
    for callee in ("popsparse::static_::createSparseDenseMatMulLHS", "popsparse::static_::sparseDenseMatMul",
                   "popsparse::static_::MatMulParams::createForSparseDense",
                   "popsparse::static_::Partitioner::Partitioner", "popsparse::CSRMatrix::CSRMatrix"):
        assert callee in calls, f"{callee} not found by the call extraction"
    assert arity_errors(code, api) == []


def test_checks_fail_on_wrong_names_and_arities(api):
    """The gate can fail: the names and call shapes the op had before (finding 1) are rejected."""
    bad = """
    #include <popsparse/SparseTensor.hpp>
    using Cache = popsparse::PlanningCache;
    std::unique_ptr<popsparse::SparseTensor> sparse_;
    auto y = popsparse::static_::sparseDenseMatMul(graph, lhs, rhs);
    auto p = popsparse::static_::MatMulParams::createForSparseDense(m, k, n);
    """
    assert unknown_names(bad, api) == ["popsparse::PlanningCache", "popsparse::SparseTensor"]
    errors = arity_errors(bad, api)
    assert len(errors) == 2 and "sparseDenseMatMul called with 3" in errors[0] and "createForSparseDense" in errors[1]


def test_op_uses_static_types_and_own_domain():
    code = strip_comments((OPS / "sparse_matmul.cpp").read_text())
    assert "popsparse::static_::SparseTensor" in code and "popsparse::static_::PlanningCache" in code
    raw = (OPS / "sparse_matmul.cpp").read_text()
    assert '"ai.graphcore"' not in raw
    assert "static std::set<const poplar::Graph" not in raw  # finding 9: no codelet record keyed by graph address


def test_readme_lists_exactly_the_poplar_names():
    code = strip_comments((OPS / "sparse_matmul.cpp").read_text())
    used = set(re.findall(r"\b(poplar(?:::\w+)+)", code))
    readme = (OPS / "README.md").read_text()
    section = readme.split("## Poplar names the op relies on", 1)
    assert len(section) == 2, "popart_ops/README.md needs a '## Poplar names the op relies on' section"
    listed = set(re.findall(r"`(poplar(?:::\w+)+)`", section[1].split("\n## ", 1)[0]))
    assert used == listed, f"missing from README: {sorted(used - listed)}; not used: {sorted(listed - used)}"


def test_build_files_use_popart_only():
    cmake = (OPS / "CMakeLists.txt").read_text()
    assert re.search(r"find_package\(popart\s+REQUIRED\s+COMPONENTS\s+popart-only\)|"
                     r"find_package\(popart\s+COMPONENTS\s+popart-only", cmake)
    assert "popart-only" in cmake.split("target_link_libraries", 1)[1]
    make = (OPS / "Makefile").read_text()
    for flag in ("-std=c++14", "-fPIC", "-shared", "-DONNX_NAMESPACE=onnx", "-lpopart", "-lpopsparse"):
        assert flag in make
