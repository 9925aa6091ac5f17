//! `mesh-runtime freeze`: every query dataset of a bundle in mode `bundle`
//! is run once and written into the bundle as a CSV file (with its column
//! types declared, so reading it back gives the same values), and the
//! dataset becomes an ordinary bundled one. Connections no dataset reads any
//! more leave the config, so the frozen service never needs the database.
//!
//! A frozen text value that is empty reads back as null (a CSV empty field).

use std::path::{Path, PathBuf};

use crate::backend::Connection;
use crate::config::{Bundle, DatasetMode, DatasetSource, SERVICE_FILE};
use crate::dataset::{Dataset, ValueRef};

/// Freezes the bundle in `dir` in place; one line per dataset frozen.
pub async fn freeze(dir: &Path) -> Result<Vec<String>, String> {
    let bundle = Bundle::open(dir).map_err(|e| e.to_string())?;
    let mut config = bundle.config.clone();
    let mut report = Vec::new();
    for (name, ds) in config.datasets.iter_mut() {
        let DatasetSource::Sql(sql) = &ds.source else {
            continue;
        };
        if ds.mode != DatasetMode::Bundle {
            continue;
        }
        let conn_config = bundle
            .config
            .connections
            .get(&sql.connection)
            .ok_or_else(|| format!("dataset `{name}`: unknown connection `{}`", sql.connection))?;
        let conn = Connection::open(&bundle, &sql.connection, conn_config)
            .map_err(|e| format!("dataset `{name}`: {e}"))?;
        let data = conn
            .load(name, &sql.query, &ds.key, ds.duplicates)
            .await
            .map_err(|e| match e.to_string() {
                m if m.contains(&format!("dataset `{name}`")) => m,
                m => format!("dataset `{name}`: {m}"),
            })?;
        let rel = PathBuf::from(format!("datasets/{name}.frozen.csv"));
        write_csv(&data, &dir.join(&rel)).map_err(|e| format!("dataset `{name}`: {e}"))?;
        let schema = data.schema();
        ds.columns = schema
            .names
            .iter()
            .cloned()
            .zip(schema.types.iter().copied())
            .collect();
        ds.source = DatasetSource::Csv(rel);
        ds.mode = DatasetMode::Preload;
        report.push(format!(
            "dataset `{name}`: {} rows frozen into the bundle",
            data.rows()
        ));
    }
    let read: Vec<String> = config
        .datasets
        .values()
        .filter_map(|d| match &d.source {
            DatasetSource::Sql(s) => Some(s.connection.clone()),
            DatasetSource::Csv(_) => None,
        })
        .collect();
    config.connections.retain(|c, _| read.contains(c));
    let json = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(SERVICE_FILE), json)
        .map_err(|e| format!("writing {}: {e}", dir.join(SERVICE_FILE).display()))?;
    Ok(report)
}

/// The dataset as CSV: a header, then one line per row; nulls empty.
fn write_csv(data: &Dataset, path: &Path) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut w = csv::Writer::from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let schema = data.schema();
    w.write_record(&schema.names).map_err(|e| e.to_string())?;
    let mut fields: Vec<String> = Vec::with_capacity(schema.names.len());
    for row in 0..data.rows() {
        fields.clear();
        for column in 0..schema.names.len() {
            fields.push(match data.value(row, column) {
                ValueRef::Null => String::new(),
                ValueRef::Int(v) => v.to_string(),
                // Display gives the shortest text that parses back to `v`.
                ValueRef::Float(v) => v.to_string(),
                ValueRef::Bool(v) => v.to_string(),
                ValueRef::Str(v) => v.to_owned(),
            });
        }
        w.write_record(&fields).map_err(|e| e.to_string())?;
    }
    w.flush().map_err(|e| format!("{}: {e}", path.display()))
}
