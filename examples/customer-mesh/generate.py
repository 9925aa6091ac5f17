"""Generate the customer-mesh example: synthetic data and a propensity model.

Run with:
    python3 -m venv /var/cache/mesh/pyenv
    /var/cache/mesh/pyenv/bin/pip install -r examples/customer-mesh/requirements.txt
    /var/cache/mesh/pyenv/bin/python examples/customer-mesh/generate.py

Writes, next to this script:
    customers.csv    10,000 customers (id, age, gender, region, campaign, loyalty_member)
    behavior.csv     a 30/90-day behaviour summary per customer
    high_value.onnx  a scikit-learn Pipeline (OneHotEncoder + StandardScaler +
                     LogisticRegression) exported with skl2onnx, one graph input
                     per feature column, named like the CSV column
    high_value_gbt.onnx   the same inputs and preprocessing, a
                     GradientBoostingClassifier (a second generation)
    high_value_slow.onnx  the same inputs, a deliberately big RandomForest
                     (slow to score: the slow-shadow benchmark)

Everything is seeded: running it twice gives the same CSVs and the same model.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20261107
N_CUSTOMERS = 10_000

GENDERS = ["F", "M", "X"]
REGIONS = ["north", "south", "east", "west", "central"]
CAMPAIGNS = ["none", "spring_sale", "loyalty_push", "winback", "referral"]

CATEGORICAL = ["gender", "region", "campaign"]
NUMERIC = [
    "age",
    "loyalty_member",
    "total_spend_30d",
    "orders_90d",
    "days_since_last_order",
    "avg_basket",
]
FEATURES = ["age", "gender", "region", "campaign", "loyalty_member",
            "total_spend_30d", "orders_90d", "days_since_last_order", "avg_basket"]

# Opsets the mesh engine implements (ai.onnx up to 21, ai.onnx.ml up to 3).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# The slow forest: enough trees to be >= 20x the logistic model per row,
# small enough to stay under 8 MB.
SLOW_TREES = 300
SLOW_DEPTH = 8


def make_data(seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Return (customers, behavior, label) for N_CUSTOMERS synthetic customers."""
    rng = np.random.default_rng(seed)
    n = N_CUSTOMERS
    ids = [f"C{i:05d}" for i in range(1, n + 1)]

    age = rng.integers(18, 81, size=n)
    gender = rng.choice(GENDERS, size=n, p=[0.49, 0.47, 0.04])
    region = rng.choice(REGIONS, size=n, p=[0.22, 0.2, 0.2, 0.18, 0.2])
    campaign = rng.choice(CAMPAIGNS, size=n, p=[0.4, 0.2, 0.15, 0.15, 0.1])
    loyalty = (rng.random(n) < 0.25 + 0.004 * (age - 18)).astype(np.int64)

    # Behaviour: more orders for loyalty members and middle ages.
    activity = np.exp(rng.normal(0.0, 0.6, size=n)) * (1.0 + 0.6 * loyalty)
    orders_90d = rng.poisson(2.5 * activity)
    avg_basket = np.round(np.exp(rng.normal(3.6, 0.5, size=n)) * (1 + 0.004 * (age - 18)), 2)
    last = rng.exponential(25.0 / (1.0 + orders_90d / 3.0))
    days_since_last_order = np.minimum(np.floor(last), 365).astype(np.int64)
    days_since_last_order[orders_90d == 0] += 90
    orders_30d = rng.binomial(orders_90d, 0.35)
    total_spend_30d = np.round(orders_30d * avg_basket * np.exp(rng.normal(0, 0.15, size=n)), 2)

    customers = pd.DataFrame({
        "customer_id": ids,
        "age": age.astype(np.int64),
        "gender": gender,
        "region": region,
        "campaign": campaign,
        "loyalty_member": loyalty,
    })
    behavior = pd.DataFrame({
        "customer_id": ids,
        "total_spend_30d": total_spend_30d,
        "orders_90d": orders_90d.astype(np.int64),
        "days_since_last_order": days_since_last_order,
        "avg_basket": avg_basket,
    })

    # High spend over the next 30 days: mostly driven by recent behaviour,
    # a little by loyalty, region and campaign, plus logistic noise.
    region_effect = pd.Series(region).map(
        {"north": 0.1, "south": -0.2, "east": 0.0, "west": 0.3, "central": -0.1}).to_numpy()
    campaign_effect = pd.Series(campaign).map(
        {"none": 0.0, "spring_sale": 0.4, "loyalty_push": 0.3, "winback": -0.2,
         "referral": 0.2}).to_numpy()
    logit = (-2.2
             + 0.006 * total_spend_30d
             + 0.18 * orders_90d
             - 0.025 * days_since_last_order
             + 0.012 * avg_basket
             + 0.6 * loyalty
             - 0.01 * np.abs(age - 45)
             + region_effect + campaign_effect
             + rng.logistic(0.0, 1.0, size=n))
    label = (logit > 0).astype(np.int64)
    return customers, behavior, label


def features(customers: pd.DataFrame, behavior: pd.DataFrame) -> pd.DataFrame:
    """Join the two tables into the model's feature frame (columns = graph inputs)."""
    df = customers.merge(behavior, on="customer_id", validate="one_to_one")
    return df[FEATURES]


def preprocessor(numeric: str = "scale") -> ColumnTransformer:
    num = StandardScaler() if numeric == "scale" else "passthrough"
    return ColumnTransformer([
        ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
        ("num", num, NUMERIC),
    ])


def initial_types() -> list:
    """One graph input per feature column, named exactly like the CSV column."""
    return [
        (c, StringTensorType([None, 1]) if c in CATEGORICAL else FloatTensorType([None, 1]))
        for c in FEATURES
    ]


def to_onnx(pipeline: Pipeline, name: str) -> bytes:
    clf = pipeline.steps[-1][1]
    onx = convert_sklearn(
        pipeline,
        name=name,
        initial_types=initial_types(),
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    return onx.SerializeToString()


def train_logistic(x: pd.DataFrame, y: np.ndarray) -> Pipeline:
    pipe = Pipeline([
        ("prep", preprocessor("scale")),
        ("clf", LogisticRegression(C=1.0, max_iter=1000)),
    ])
    return pipe.fit(x, y)


def train_gbt(x: pd.DataFrame, y: np.ndarray) -> Pipeline:
    pipe = Pipeline([
        ("prep", preprocessor("scale")),
        ("clf", GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=SEED)),
    ])
    return pipe.fit(x, y)


def train_slow(x: pd.DataFrame, y: np.ndarray) -> Pipeline:
    """Many deep trees on purpose: scoring a row walks every one of them."""
    pipe = Pipeline([
        ("prep", preprocessor("scale")),
        ("clf", RandomForestClassifier(n_estimators=SLOW_TREES, max_depth=SLOW_DEPTH,
                                       min_samples_leaf=4, random_state=SEED)),
    ])
    return pipe.fit(x, y)


def main() -> None:
    customers, behavior, label = make_data()
    customers.to_csv(HERE / "customers.csv", index=False)
    behavior.to_csv(HERE / "behavior.csv", index=False, float_format="%.2f")
    # Train on the data as written (the CSV round trip rounds floats to cents).
    customers = pd.read_csv(HERE / "customers.csv")
    behavior = pd.read_csv(HERE / "behavior.csv")
    x = features(customers, behavior)
    pipe = train_logistic(x, label)
    (HERE / "high_value.onnx").write_bytes(to_onnx(pipe, "high_value"))
    acc = (pipe.predict(x) == label).mean()
    gbt = train_gbt(x, label)
    (HERE / "high_value_gbt.onnx").write_bytes(to_onnx(gbt, "high_value_gbt"))
    slow = train_slow(x, label)
    (HERE / "high_value_slow.onnx").write_bytes(to_onnx(slow, "high_value_slow"))
    print(f"customers={len(customers)} positives={label.mean():.3f} train_accuracy={acc:.3f}")


if __name__ == "__main__":
    main()
