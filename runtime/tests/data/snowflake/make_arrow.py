"""Writes the Arrow IPC streams the runtime's Snowflake reader is unit-tested with.

Run with the fakesnow venv (it has pyarrow): python make_arrow.py
The shapes follow what Snowflake sends: NUMBER(p, s) as integers of the smallest width with a
`scale` field metadata (or as decimal128, as fakesnow does), REAL as float64, TEXT as utf8,
BOOLEAN as bool, DATE as date32, TIMESTAMP_NTZ as a struct (epoch, fraction).
"""
import datetime
import decimal

import pyarrow as pa


def meta(logical, scale=0):
    return {"logicalType": logical, "scale": str(scale), "precision": "38", "charLength": "0"}


schema = pa.schema(
    [
        pa.field("I8", pa.int8(), metadata=meta("FIXED")),
        pa.field("I16", pa.int16(), metadata=meta("FIXED")),
        pa.field("I32", pa.int32(), metadata=meta("FIXED")),
        pa.field("I64", pa.int64(), metadata=meta("FIXED")),
        pa.field("U32", pa.uint32(), metadata=meta("FIXED")),
        pa.field("SCALED", pa.int32(), metadata=meta("FIXED", 2)),
        pa.field("DEC0", pa.decimal128(38, 0), metadata=meta("FIXED")),
        pa.field("DEC2", pa.decimal128(10, 2), metadata=meta("FIXED", 2)),
        pa.field("F64", pa.float64(), metadata=meta("REAL")),
        pa.field("F32", pa.float32(), metadata=meta("REAL")),
        pa.field("B", pa.bool_(), metadata=meta("BOOLEAN")),
        pa.field("S", pa.string(), metadata=meta("TEXT")),
        pa.field("LS", pa.large_string(), metadata=meta("TEXT")),
        pa.field("D", pa.date32(), metadata=meta("DATE")),
        pa.field("N", pa.null(), metadata=meta("TEXT")),
    ]
)

rows = [
    (-8, -16, -32, -(2**40), 4000000000, 1234, 10**15, decimal.Decimal("12.34"), 1.5, 0.25, True, "ann", "x", datetime.date(2024, 1, 2), None),
    (None, None, None, None, None, None, None, None, None, None, None, None, None, None, None),
    (127, 32767, 2**31 - 1, 2**63 - 1, 0, -5, -(10**15), decimal.Decimal("-0.01"), float("nan"), -2.0, False, "", "ünï", datetime.date(1969, 12, 31), None),
]


def batch(rs):
    cols = list(zip(*rs))
    return pa.record_batch([pa.array(list(c), type=f.type) for c, f in zip(cols, schema)], schema=schema)


with open("types.arrows", "wb") as out, pa.ipc.new_stream(out, schema) as w:
    w.write_batch(batch(rows[:2]))
    w.write_batch(batch(rows[2:]))

ts_schema = pa.schema(
    [
        pa.field("ID", pa.int64(), metadata=meta("FIXED")),
        pa.field(
            "TS",
            pa.struct([pa.field("epoch", pa.int64(), nullable=False), pa.field("fraction", pa.int32(), nullable=False)]),
            metadata=meta("TIMESTAMP_NTZ", 9),
        ),
    ]
)
ts = pa.StructArray.from_arrays([pa.array([1704164645]), pa.array([0], pa.int32())], fields=list(ts_schema.field("TS").type))
with open("timestamp.arrows", "wb") as out, pa.ipc.new_stream(out, ts_schema) as w:
    w.write_batch(pa.record_batch([pa.array([1]), ts], schema=ts_schema))
