"""The store's rules, checked on the source: SQL only in omad's store/, status columns written only by transitions."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ROOT / "daemons"
STORE = DAEMONS / "omad" / "omad" / "store"
MIGRATIONS = STORE / "migrations"

# TEMPORARY (issue 12): another branch is moving these folders' SQL into store/ while this test lands. The lead
# empties this tuple once it is merged; after that nothing outside store/ may hold SQL.
NOT_YET_MOVED = ("omad/omad/jobs", "omad/omad/schedule")

SQL = re.compile(
    r"\bSELECT\b[\s\S]+?\bFROM\b|\b(?:INSERT|REPLACE)\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+(?:\s+AS\s+\w+)?\s+SET\b"
    r"|\bDELETE\s+FROM\b|\bCREATE\s+(?:TEMP\s+|UNIQUE\s+)?(?:TABLE|INDEX|TRIGGER|VIEW)\b|\bDROP\s+(?:TABLE|INDEX)\b"
    r"|\bALTER\s+TABLE\b|\bPRAGMA\s+\w+",
    re.IGNORECASE)


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: prose may say "select ... from" without being SQL."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """Every string literal (f-strings' literal parts included) but docstrings, in source order."""
    skip = docstrings(tree)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]
    yield from sorted(found, key=lambda n: (n.lineno, n.col_offset))


def sql_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(ROOT)}:{n.lineno}: {m.group(0)[:60]!r}"
            for n in strings(tree) if (m := SQL.search(str(n.value)))]


def outside_store() -> Iterator[Path]:
    for path in sorted(DAEMONS.rglob("*.py")):
        rel = path.relative_to(DAEMONS).as_posix()
        if path.is_relative_to(STORE) or any(rel.startswith(folder + "/") for folder in NOT_YET_MOVED):
            continue
        yield path


def test_no_sql_outside_omads_store() -> None:
    found = [hit for path in outside_store() for hit in sql_in(path)]
    assert not found, "SQL outside daemons/omad/omad/store/ (give it an owner there):\n" + "\n".join(found)


def test_the_sql_scan_sees_sql() -> None:
    assert sql_in(STORE / "contexts.py") and sql_in(STORE / "db.py")  # the scan is not blind
    for text in ("SELECT a FROM t", "insert into t (a) values (1)", "UPDATE t SET a = 1", "DELETE FROM t",
                 "CREATE TABLE t (a)", "REPLACE INTO t VALUES (1)"):
        assert SQL.search(text), text
    assert not SQL.search("delete the mount from the list, then update the row")


# -- status columns ------------------------------------------------------------------------------------------

def status_columns() -> set[str]:
    """`status`, `current_status`, and every other *_status column whose values a CHECK constraint lists."""
    text = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    checked = re.findall(r"\b(\w*status)\s+TEXT\b[^,\n]*\n?[^,]*?CHECK\s*\(\s*\1\s+IN\b", text)
    return {"status", "current_status", *checked}


def status_writes(sql: str, columns: set[str]) -> set[str]:
    """The status columns a piece of SQL assigns (UPDATE … SET, upserts) or inserts."""
    out = set()
    for clause in re.findall(r"\bSET\b(.*?)(?=\bWHERE\b|\bFROM\b|\bRETURNING\b|;|$)", sql, re.I | re.S):
        out |= {c for c in re.findall(r"(?:^|,)\s*(?:\w+\.)?(\w+)\s*=", clause) if c in columns}
    for names in re.findall(r"\b(?:INSERT|REPLACE)\b[^(;]*?\bINTO\s+\w+\s*\(([^)]*)\)", sql, re.I | re.S):
        out |= {c.strip() for c in names.split(",") if c.strip() in columns}
    return out


def functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and the methods of module-level classes (nested functions count as theirs)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def declared_transitions(tree: ast.Module) -> tuple[str, ...] | None:
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == "TRANSITIONS" and node.value is not None:
            value = ast.literal_eval(node.value)
            assert isinstance(value, tuple) and all(isinstance(v, str) for v in value), "TRANSITIONS: names"
            return value
    return None


def misplaced_status_writes(path: Path, columns: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    transitions = declared_transitions(tree)
    defined = {f.name for f in functions(tree)}
    out = [f"{path.name}: TRANSITIONS names {name!r}, which it does not define"
           for name in transitions or () if name not in defined]
    for func in functions(tree):
        written = status_writes(" ".join(str(n.value) for n in strings(func)), columns)
        if written and func.name not in (transitions or ()):
            out.append(f"{path.name}:{func.lineno}: {func.name}() writes {', '.join(sorted(written))} but is not "
                       f"in the module's TRANSITIONS {transitions}")
    return out


def test_status_columns_change_only_through_declared_transitions() -> None:
    columns = status_columns()
    assert {"status", "current_status"} <= columns
    found = [p for path in sorted(STORE.glob("*.py")) for p in misplaced_status_writes(path, columns)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("sql, written", [
    ("UPDATE restore_mounts SET status = ?, ended_at = ? WHERE id = ? AND status IN (?, ?)", {"status"}),
    ("UPDATE t SET a = CASE WHEN status = 'x' THEN 1 END WHERE status = ?", set()),
    ("UPDATE c SET updated_at = ?, current_status = ? WHERE context_id = ?", {"current_status"}),
    ("INSERT INTO jobs (id, job_type, status) VALUES (?, ?, ?)", {"status"}),
    ("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO UPDATE SET status = excluded.status", {"status"}),
    ("INSERT INTO audit_log (at, outcome) VALUES (?, ?)", set()),
    ("SELECT status FROM t WHERE status = ?", set()),
])
def test_the_status_scan_sees_writes(sql: str, written: set[str]) -> None:
    assert status_writes(sql, {"status", "current_status"}) == written


def test_an_undeclared_writer_is_reported(tmp_path: Path) -> None:
    module = tmp_path / "things.py"
    module.write_text('TRANSITIONS = ("finish", "gone")\n\n'
                      'async def finish(tx):\n    await tx.execute("UPDATE things SET status = \'done\'")\n\n'
                      'async def sneak(tx):\n    await tx.execute("UPDATE things SET note = ?, status = ?")\n')
    found = misplaced_status_writes(module, {"status"})
    assert len(found) == 2 and "'gone'" in found[0] and "sneak()" in found[1]
