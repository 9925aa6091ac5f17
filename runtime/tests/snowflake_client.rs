//! The Snowflake client against a real server speaking Snowflake's connector
//! protocol: fakesnow (`fakesnow -s`, DuckDB underneath) on loopback.
//!
//! Needs `MESH_TEST_SNOWFLAKE_URL` (set by `scripts/test`, which starts
//! fakesnow on 127.0.0.1:15055). Without it the tests fail, saying so.
//!
//! fakesnow does not check credentials (any password or JWT logs in), nor
//! warehouses or roles; it answers results as Arrow IPC (`rowsetBase64`) and
//! DML row counts as a JSON `rowset`, so both decoders run here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::backend::{Connection, LiveError};
use mesh_runtime::config::{ColumnType, Duplicates};
use mesh_runtime::dataset::{KeyRef, Value, ValueRef};
use mesh_runtime::snowflake::{
    Bind, Client, Credential, KeyPair, Settings, SnowflakeError, preload,
};
use mesh_runtime::sql::SqlError;

use common::snowflake_url;

const TIMEOUT: Duration = Duration::from_secs(30);

fn settings(credential: Credential) -> Settings {
    Settings {
        account: "meshtest".into(),
        user: "mesh_reader".into(),
        credential,
        warehouse: Some("MESH_WH".into()),
        database: "MESH_TEST".into(),
        schema: Some("PUBLIC".into()),
        role: Some("MESH_ROLE".into()),
        url: Some(snowflake_url()),
        statement_timeout: Duration::from_secs(10),
        pool_size: 2,
    }
}

fn client() -> Client {
    Client::new(
        "warehouse",
        settings(Credential::Password("not-checked".into())),
    )
    .expect("client")
}

/// A table name of this test and process: tests share one fakesnow.
fn table(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

async fn exec(c: &Client, sql: &str) {
    c.query(sql, &[], TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A `people` table in MESH_TEST.PUBLIC (made by `scripts/services start`:
/// concurrent DDL on one database conflicts in fakesnow's DuckDB catalog).
async fn setup(c: &Client, name: &str) {
    exec(
        c,
        &format!(
            "CREATE OR REPLACE TABLE {name} (customer_id INT, name VARCHAR, score FLOAT, \
             vip BOOLEAN, balance NUMBER(10, 2), since DATE, seen TIMESTAMP_NTZ)"
        ),
    )
    .await;
    exec(
        c,
        &format!(
            "INSERT INTO {name} VALUES \
             (1, 'ann', 1.5, TRUE, 12.34, '2024-01-02', '2024-01-02 03:04:05'), \
             (2, NULL, NULL, NULL, NULL, NULL, NULL), \
             (3, 'bo''b', -2.25, FALSE, -0.5, '1999-12-31', '1999-12-31 23:59:59')"
        ),
    )
    .await;
}

#[tokio::test]
async fn query_with_binds_types_and_nulls() {
    let c = client();
    let t = table("people_q");
    setup(&c, &t).await;

    let r = c
        .query(
            &format!(
                "SELECT customer_id, name, score, vip, balance FROM {t} WHERE customer_id = ? OR name = ? ORDER BY customer_id"
            ),
            &[Bind::Int(2), Bind::Text("bo'b".into())],
            TIMEOUT,
        )
        .await
        .expect("query");
    let names: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["CUSTOMER_ID", "NAME", "SCORE", "VIP", "BALANCE"]);
    let types: Vec<Option<ColumnType>> = r.columns.iter().map(|c| c.ty).collect();
    use ColumnType::*;
    assert_eq!(
        types,
        [
            Some(Int),
            Some(String),
            Some(Float),
            Some(Bool),
            Some(Float)
        ]
    );
    assert_eq!(
        r.rows,
        [
            vec![
                Value::Int(2),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null
            ],
            vec![
                Value::Int(3),
                Value::Str("bo'b".into()),
                Value::Float(-2.25),
                Value::Bool(false),
                Value::Float(-0.5)
            ],
        ]
    );

    // A DML answer (JSON rowset): rows updated, multi-joined rows updated.
    let r = c
        .query(
            &format!("UPDATE {t} SET score = ? WHERE customer_id = ?"),
            &[Bind::Float(9.5), Bind::Int(1)],
            TIMEOUT,
        )
        .await
        .expect("update");
    assert_eq!(r.rows, [vec![Value::Int(1), Value::Int(0)]]);

    // Types the runtime does not hold are reported without a runtime type.
    let cols = c
        .describe(&format!("SELECT since, seen FROM {t}"), TIMEOUT)
        .await
        .expect("describe");
    assert_eq!(cols[0].snowflake_type, "date");
    assert_eq!(cols[0].ty, None);
    assert_eq!(cols[1].snowflake_type, "timestamp_ntz");
}

#[tokio::test]
async fn bad_query_is_a_snowflake_error() {
    let c = client();
    let e = c
        .query("SELECT * FROM no_such_table_anywhere", &[], TIMEOUT)
        .await
        .unwrap_err();
    match &e {
        SnowflakeError::Query { code, message } => {
            assert_eq!(code, "002003", "{e}");
            assert!(message.contains("NO_SUCH_TABLE_ANYWHERE"), "{e}");
        }
        other => panic!("expected a query error, got {other:?}"),
    }
    let e = c.query("SELEC 1", &[], TIMEOUT).await.unwrap_err();
    assert!(
        matches!(&e, SnowflakeError::Query { code, .. } if code == "001003"),
        "{e:?}"
    );
    assert!(!format!("{e} {e:?}").contains("not-checked"));
}

#[tokio::test]
async fn key_pair_login_works() {
    let key = KeyPair::from_pem(include_str!("data/snowflake/test_key.p8")).expect("key");
    let c = Client::new("warehouse", settings(Credential::KeyPair(Box::new(key)))).expect("client");
    let r = c
        .query("SELECT 41 + 1 AS answer", &[], TIMEOUT)
        .await
        .expect("query");
    assert_eq!(r.rows, [vec![Value::Int(42)]]);
    assert!(!format!("{c:?}").contains("PRIVATE"));
}

#[tokio::test]
async fn statement_timeout_is_enforced() {
    let c = client();
    // A statement that takes seconds on DuckDB, against a 1 ms limit.
    let e = c
        .query(
            "SELECT COUNT(*) FROM TABLE(GENERATOR(ROWCOUNT => 100000000)) a, TABLE(GENERATOR(ROWCOUNT => 100)) b",
            &[],
            Duration::from_millis(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, SnowflakeError::Timeout { ms: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("did not answer within 1 ms"), "{e}");
}

#[tokio::test]
async fn preload_dataset_casts_other_types_to_text() {
    let c = client();
    let t = table("people_p");
    setup(&c, &t).await;
    let ds = preload(
        &c,
        "people",
        &format!("select * from {t}"),
        "customer_id",
        Duplicates::Error,
    )
    .await
    .expect("preload");
    let schema = ds.schema();
    assert_eq!(
        schema.names,
        [
            "customer_id",
            "name",
            "score",
            "vip",
            "balance",
            "since",
            "seen"
        ]
    );
    use ColumnType::*;
    assert_eq!(
        schema.types,
        [Int, String, Float, Bool, Float, String, String]
    );
    assert_eq!(ds.rows(), 3);
    let row = ds.find(KeyRef::Int(1)).expect("row 1");
    assert_eq!(ds.value(row, 1), ValueRef::Str("ann"));
    assert_eq!(ds.value(row, 4), ValueRef::Float(12.34));
    assert_eq!(ds.value(row, 5), ValueRef::Str("2024-01-02"));
    assert!(matches!(ds.value(row, 6), ValueRef::Str(s) if s.starts_with("2024-01-02 03:04:05")));
    let row = ds.find(KeyRef::Int(2)).expect("row 2");
    for col in 1..7 {
        assert_eq!(ds.value(row, col), ValueRef::Null, "column {col}");
    }

    let e = preload(
        &c,
        "people",
        &format!("select * from {t}"),
        "nope",
        Duplicates::Error,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, SqlError::Schema { reason, .. } if reason.contains("key column `nope`")),
        "{e}"
    );
}

#[tokio::test]
async fn live_dataset_fetches_by_bound_key() {
    let c = Arc::new(client());
    let t = table("people_l");
    setup(&c, &t).await;
    let conn = Connection::Snowflake(c.clone());
    let live = conn
        .live(
            "people",
            &format!("select customer_id, name, balance from {t}"),
            "customer_id",
            Duplicates::Error,
            None,
        )
        .await
        .expect("open");
    assert_eq!(live.schema().names, ["customer_id", "name", "balance"]);
    let fetch = async |table: &mesh_runtime::backend::LiveTable, key: KeyRef<'_>| {
        table
            .fetch(key)
            .await
            .expect("fetch")
            .map(|row| row.to_vec())
    };
    assert_eq!(
        fetch(&live, KeyRef::Int(3)).await,
        Some(vec![
            Value::Int(3),
            Value::Str("bo'b".into()),
            Value::Float(-0.5)
        ])
    );
    // A key sent as text is bound as the integer it spells; others find nothing.
    assert_eq!(
        fetch(&live, KeyRef::Str("1")).await.map(|r| r[0].clone()),
        Some(Value::Int(1))
    );
    assert_eq!(fetch(&live, KeyRef::Str("x' OR 1=1 --")).await, None);
    assert_eq!(fetch(&live, KeyRef::Int(99)).await, None);
    // Queries that reached the server (the text that spells no integer sent none).
    assert_eq!(live.query_counts(), (3, 0));

    // A text key, bound as text (no SQL injection through the key).
    let by_name = conn
        .live(
            "by_name",
            &format!("select name, customer_id from {t}"),
            "name",
            Duplicates::Error,
            None,
        )
        .await
        .expect("open");
    assert_eq!(
        fetch(&by_name, KeyRef::Str("bo'b")).await,
        Some(vec![Value::Str("bo'b".into()), Value::Int(3)])
    );
    assert_eq!(fetch(&by_name, KeyRef::Str("x' OR '1'='1")).await, None);

    // Two rows for a key with `duplicates = "error"`: a failed query, not a row.
    exec(
        &c,
        &format!("INSERT INTO {t} (customer_id, name) VALUES (1, 'dup')"),
    )
    .await;
    let e = live.fetch(KeyRef::Int(1)).await.unwrap_err();
    assert!(
        matches!(&e, LiveError::Query { reason, .. } if reason == "duplicate key 1"),
        "{e:?}"
    );
}
