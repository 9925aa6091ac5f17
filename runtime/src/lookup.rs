//! Lookup endpoints: keys in, rows out, rows of several datasets merged by key.
//!
//! The answer holds the key fields as sent, then every non-key column of each
//! dataset (null where that dataset has no row). A key found in no dataset is
//! a 404.

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::error::AppError;
use crate::input::Input;
use crate::service::{LookupEndpoint, RowData};

/// A merged row, serialized as a JSON object.
pub struct Merged<'a> {
    ep: &'a LookupEndpoint,
    keys: &'a [Input<'a>],
    rows: Vec<Option<RowData<'a>>>,
}

/// Looks up one item whose key fields are `keys` (one per `ep.fields` slot).
pub async fn lookup<'a>(
    ep: &'a LookupEndpoint,
    keys: &'a [Input<'a>],
) -> Result<Merged<'a>, AppError> {
    for (slot, input) in keys.iter().enumerate() {
        match input {
            Input::Str(_) | Input::Int(_) => {}
            Input::Absent | Input::Null => {
                return Err(AppError::bad_request(
                    "missing_key",
                    format!("missing key `{}`", ep.fields.name(slot)),
                ));
            }
            other => {
                return Err(AppError::bad_request(
                    "invalid_key",
                    format!(
                        "key `{}` must be a string or an integer, got {}",
                        ep.fields.name(slot),
                        other.type_name()
                    ),
                ));
            }
        }
    }
    let mut rows = Vec::with_capacity(ep.parts.len());
    for part in &ep.parts {
        let Some(key) = keys[part.key_slot].as_key() else {
            rows.push(None);
            continue;
        };
        rows.push(part.table.fetch(key).await?);
    }
    if rows.iter().all(Option::is_none) {
        let described: Vec<String> = (0..ep.fields.len())
            .filter_map(|s| {
                keys[s]
                    .as_key()
                    .map(|k| format!("`{}` = {k}", ep.fields.name(s)))
            })
            .collect();
        return Err(AppError::not_found(
            "not_found",
            format!("no row with {}", described.join(", ")),
        ));
    }
    Ok(Merged { ep, keys, rows })
}

impl Serialize for Merged<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (slot, key) in self.keys.iter().enumerate() {
            let name = self.ep.fields.name(slot);
            match key {
                Input::Str(v) => map.serialize_entry(name, &**v)?,
                Input::Int(v) => map.serialize_entry(name, v)?,
                _ => map.serialize_entry(name, &())?,
            }
        }
        for (part, row) in self.ep.parts.iter().zip(&self.rows) {
            let names = &part.table.schema().names;
            for &col in &part.columns {
                match row {
                    Some(row) => map.serialize_entry(&names[col], &row.value(col))?,
                    None => map.serialize_entry(&names[col], &())?,
                }
            }
        }
        map.end()
    }
}
