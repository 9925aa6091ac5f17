//! fakesnow, the Snowflake test server: its URL and statements run on it
//! with the runtime's own client. Included by the runtime's tests
//! (`tests/common`) and the workspace's (`tests/support`).

use std::time::Duration;

/// fakesnow's URL (`MESH_TEST_SNOWFLAKE_URL`).
pub fn snowflake_url() -> String {
    std::env::var("MESH_TEST_SNOWFLAKE_URL").unwrap_or_else(|_| {
        panic!(
            "MESH_TEST_SNOWFLAKE_URL is not set: run the tests with `scripts/test` (it starts fakesnow \
             and makes database MESH_TEST), or run `scripts/services start` and `eval \"$(scripts/services env)\"`"
        )
    })
}

/// Runs statements on fakesnow's MESH_TEST.PUBLIC, one at a time, with the
/// runtime's own client (fakesnow checks no credentials).
pub fn snowflake_exec(statements: &[&str]) {
    use mesh_runtime::snowflake::{Client, Credential, Settings};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let settings = Settings {
            account: "meshtest".into(),
            user: "mesh_test".into(),
            credential: Credential::Password("not-checked".into()),
            warehouse: None,
            database: "MESH_TEST".into(),
            schema: Some("PUBLIC".into()),
            role: None,
            url: Some(snowflake_url()),
            statement_timeout: Duration::from_secs(30),
            pool_size: 1,
        };
        let client = Client::new("test", settings).expect("client");
        for sql in statements {
            client
                .query(sql, &[], Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| {
                    panic!("{sql}: {e} (is fakesnow running? `scripts/services start`)")
                });
        }
        client.close().await;
    });
}
