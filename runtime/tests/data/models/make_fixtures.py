"""Export the parity fixtures used by `runtime/tests/model_parity.rs`.

Run with:
    /var/cache/mesh/pyenv/bin/python runtime/tests/data/models/make_fixtures.py

(the venv is described in examples/customer-mesh/requirements.txt). Trains three
scikit-learn pipelines on the customer-mesh example data and writes, next to
this script, for NAME in logistic, forest, gbt:

    NAME.onnx           the standard skl2onnx export, unmodified (zipmap off,
                        one graph input per feature column)
    NAME.expected.json  200 fixed sample rows (inputs by column, in graph input
                        order) with scikit-learn's predict_proba and predict

plus two models without expectations, for the error and compatibility tests:

    logistic_zipmap.onnx  the logistic pipeline exported with ZipMap left on
    svm.onnx              an SVC (ai.onnx.ml SVMClassifier, which the engine
                          does not implement) on two numeric inputs

Each export is also checked here with onnx's reference evaluator, so a
mismatch in the Rust engine is the engine's, not the exporter's.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import onnx
import pandas as pd
from onnx.reference import ReferenceEvaluator
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parents[3] / "examples" / "customer-mesh"
SEED = 7
N_SAMPLE = 196

spec = importlib.util.spec_from_file_location("generate", EXAMPLE / "generate.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def load() -> tuple[pd.DataFrame, np.ndarray]:
    _, _, label = gen.make_data()
    customers = pd.read_csv(EXAMPLE / "customers.csv")
    behavior = pd.read_csv(EXAMPLE / "behavior.csv")
    return gen.features(customers, behavior), label


def sample_rows(x: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(SEED)
    idx = np.sort(rng.choice(len(x), size=N_SAMPLE, replace=False))
    rows = x.iloc[idx].copy()
    # A few rows with categories never seen in training (OneHotEncoder
    # handle_unknown="ignore": all-zero one-hot) and extreme numerics.
    extra = pd.DataFrame([
        {**rows.iloc[0].to_dict(), "region": "atlantis"},
        {**rows.iloc[1].to_dict(), "gender": "", "campaign": "black_friday"},
        {**rows.iloc[2].to_dict(), "total_spend_30d": 25000.0, "orders_90d": 120},
        {**rows.iloc[3].to_dict(), "age": 0, "avg_basket": 0.0, "days_since_last_order": 9999},
    ])
    return pd.concat([rows, extra], ignore_index=True)


def onnx_feeds(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    feeds = {}
    for c in gen.FEATURES:
        if c in gen.CATEGORICAL:
            feeds[c] = rows[c].astype(str).to_numpy().astype(object).reshape(-1, 1)
        else:
            feeds[c] = rows[c].to_numpy().astype(np.float32).reshape(-1, 1)
    return feeds


def write(name: str, pipe: Pipeline, rows: pd.DataFrame) -> None:
    data = gen.to_onnx(pipe, name)
    (HERE / f"{name}.onnx").write_bytes(data)
    proba = pipe.predict_proba(rows)
    pred = pipe.predict(rows)

    # Sanity check of the export itself.
    sess = ReferenceEvaluator(onnx.load_from_string(data))
    ref_label, ref_proba = sess.run(None, onnx_feeds(rows))
    diff = float(np.abs(ref_proba - proba).max())
    assert diff <= 1e-5, f"{name}: onnx reference differs from scikit-learn by {diff}"
    assert (ref_label == pred).all(), f"{name}: onnx reference labels differ"

    inputs = []
    for c in gen.FEATURES:
        if c in gen.CATEGORICAL:
            inputs.append({"name": c, "kind": "str", "values": rows[c].astype(str).tolist()})
        else:
            inputs.append({"name": c, "kind": "f32",
                           "values": [float(v) for v in rows[c].to_numpy(dtype=np.float64)]})
    expected = {
        "model": f"{name}.onnx",
        "rows": len(rows),
        "inputs": inputs,
        "classes": [int(c) for c in pipe.classes_],
        "probabilities": [[float(p) for p in r] for r in proba],
        "labels": [int(v) for v in pred],
    }
    (HERE / f"{name}.expected.json").write_text(json.dumps(expected, indent=None) + "\n")
    print(f"{name}: {len(data)} bytes, onnx-reference max abs diff {diff:.2e}")


def main() -> None:
    x, y = load()
    rows = sample_rows(x)
    write("logistic", gen.train_logistic(x, y), rows)
    forest = Pipeline([
        ("prep", gen.preprocessor("passthrough")),
        ("clf", RandomForestClassifier(n_estimators=50, max_depth=10, min_samples_leaf=3,
                                       random_state=SEED, n_jobs=1)),
    ]).fit(x, y)
    write("forest", forest, rows)
    gbt = Pipeline([
        ("prep", gen.preprocessor("passthrough")),
        ("clf", GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=SEED)),
    ]).fit(x, y)
    write("gbt", gbt, rows)

    logistic = gen.train_logistic(x, y)
    zipmap = convert_sklearn(logistic, name="logistic_zipmap", initial_types=gen.initial_types(),
                             target_opset=gen.TARGET_OPSET)
    (HERE / "logistic_zipmap.onnx").write_bytes(zipmap.SerializeToString())

    small = x[["age", "avg_basket"]].iloc[:200]
    svm = SVC(kernel="rbf", probability=False).fit(small.to_numpy(dtype=np.float32), y[:200])
    svm_onnx = convert_sklearn(svm, name="svm", initial_types=[("X", FloatTensorType([None, 2]))],
                               options={id(svm): {"zipmap": False}}, target_opset=gen.TARGET_OPSET)
    (HERE / "svm.onnx").write_bytes(svm_onnx.SerializeToString())


if __name__ == "__main__":
    main()
