"""Two tiny models for the stack error corpus (tests/data/stack/generation-*).

    /var/cache/mesh/pyenv/bin/python tests/data/models/make_mismatched.py

other_inputs.onnx   a logistic regression on `age` and `shoe_size` (float),
                    labels 0/1: inputs that differ from the example's model
other_classes.onnx  a logistic regression on the example's numeric inputs
                    with labels "low"/"high": other classes

Seeded: running it twice writes the same files.
"""

import pathlib

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

HERE = pathlib.Path(__file__).parent
rng = np.random.default_rng(7)


def export(inputs, labels, name):
    """A pipeline with one graph input per column, as the example's model."""
    x = pd.DataFrame(rng.normal(size=(200, len(inputs))).astype(np.float32), columns=inputs)
    model = Pipeline([
        ("columns", ColumnTransformer([("numeric", "passthrough", inputs)])),
        ("classifier", LogisticRegression()),
    ]).fit(x, labels)
    onx = convert_sklearn(model, name=name, initial_types=[(n, FloatTensorType([None, 1])) for n in inputs],
                          options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    (HERE / f"{name}.onnx").write_bytes(onx.SerializeToString())


y = rng.integers(0, 2, size=200)
export(["age", "shoe_size"], y, "other_inputs")
export(["age", "total_spend_30d"], np.where(y == 1, "high", "low"), "other_classes")
