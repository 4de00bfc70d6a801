"""The pure parts of ``sagaplane import``: filling a template from a CSV row, reading
rows with their lines, and cutting chunks."""

from __future__ import annotations

import pytest

from coordinator.cli import imports
from coordinator.cli.errors import CliError
from coordinator.cli.imports import Row, RowError, chunks, fill, placeholders, read_rows
from sagaplane.v1 import coordinator_pb2 as api

ROW = {"id": "17", "qty": "3", "price": "9.5", "gift": "Yes", "tags": '["a", 1]', "n": "x"}


def test_placeholders_are_filled_typed_or_as_text() -> None:
    template = {
        "name": "order-${row.id}",
        "idempotency_key": "${row.id}",
        "context": {"qty": "${row.qty:int}", "price": "${row.price:number}", "n": "${row.n}"},
        "steps": [{"input": {"gift": "${row.gift:bool}", "tags": "${row.tags:json}"}}],
        "timeout": 30,
    }
    assert fill(template, ROW) == {
        "name": "order-17",
        "idempotency_key": "17",
        "context": {"qty": 3, "price": 9.5, "n": "x"},
        "steps": [{"input": {"gift": True, "tags": ["a", 1]}}],
        "timeout": 30,
    }
    assert sorted(placeholders(template)) == ["gift", "id", "id", "n", "price", "qty", "tags"]


def test_the_engines_references_pass_through_untouched() -> None:
    template = {
        "a": "${steps.create.output.order_id}",
        "b": "${context.customer}",
        "c": "${steps.x.output} and ${row.id}",
        "d": "$${row}",
        "e": "${rows.id}",
    }
    assert fill(template, ROW) == {
        "a": "${steps.create.output.order_id}",
        "b": "${context.customer}",
        "c": "${steps.x.output} and 17",
        "d": "$${row}",
        "e": "${rows.id}",
    }
    assert list(placeholders(template)) == ["id"]


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("x", "int", "column v: 'x' is not an integer"),
        ("nan", "number", "column v: 'nan' is not a number"),
        ("maybe", "bool", "column v: 'maybe' is not true or false"),
        ("{", "json", "column v: '{' is not JSON"),
    ],
)
def test_a_cell_that_does_not_convert_is_a_row_error(text: str, kind: str, message: str) -> None:
    with pytest.raises(RowError, match=message):
        fill(f"${{row.v:{kind}}}", {"v": text})


def test_csv_rows_carry_their_lines_and_their_errors() -> None:
    data = (
        b"id,qty\n"
        b"1,2\n"
        b"\n"  # blank: skipped
        b'"2\nstill 2",3\n'  # one record over two lines
        b"3\n"
        b"4,x\n"
    )
    template = {
        "name": "n",
        "steps": [{"name": "s", "action": "a", "input": {"q": "${row.qty:int}"}}],
    }
    rows = read_rows(data, "csv", path="f.csv", template=template, key_base="K")
    assert [(r.where, r.error) for r in rows] == [
        ("line 2", None),
        ("line 4", None),
        ("line 6", "has 1 fields, the header 2"),
        ("line 7", "column qty: 'x' is not an integer"),
    ]
    assert rows[0].request is not None
    assert rows[0].request.idempotency_key == "import:K:2"
    assert rows[1].request is not None and rows[1].request.steps[0].input["q"] == 3


def test_a_template_naming_a_missing_column_is_refused_before_any_row() -> None:
    with pytest.raises(CliError, match="does not have: qtty"):
        read_rows(b"qty\n1\n", "csv", path="f.csv", template={"x": "${row.qtty}"}, key_base="K")


def test_chunks_are_cut_by_count_and_before_the_batch_byte_limit() -> None:
    small = api.StartSagaRequest(name="n")
    rows = [Row(number=i, where=f"line {i}", request=small) for i in range(1, 1201)]
    assert [len(c) for c in chunks(rows, 500)] == [500, 500, 200]

    big = api.StartSagaRequest(name="n" * 100, idempotency_key="k" * 100)
    big.context.update({"pad": "x" * 60_000})
    fat = [Row(number=i, where=f"line {i}", request=big) for i in range(1, 101)]
    sizes = [len(c) for c in chunks(fat, 500)]
    assert sum(sizes) == 100 and len(sizes) > 1
    per_saga = big.ByteSize() + 5
    assert all(n * per_saga <= imports.SAFE_BATCH_BYTES for n in sizes)
