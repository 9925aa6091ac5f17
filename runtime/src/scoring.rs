//! How the server scores with a loaded [`Model`]: batches built from request
//! columns, large ones on the blocking pool.

use std::path::Path;
use std::sync::Arc;

use crate::model::{Batch, ClassLabels, Column, Model, Prediction};

/// Runs one batch (a column per input, in [`Model::inputs`] order).
fn predict(model: &Model, columns: Vec<Column>) -> Result<Prediction, String> {
    let batch = Batch::new(columns).map_err(|e| e.to_string())?;
    model.predict(&batch).map_err(|e| e.to_string())
}

/// Batches of at least this many rows are scored on the blocking pool, so a
/// large batch (a 1,000-row forest takes milliseconds) never holds one of
/// the few worker threads that serve every other request; smaller ones run
/// in place, where the hand-off would cost more than the work.
pub const BLOCKING_ROWS: usize = 64;

/// Scores `rows` rows, on the blocking pool when the
/// batch is large (see [`BLOCKING_ROWS`]).
pub async fn predict_rows(
    model: &Arc<Model>,
    columns: Vec<Column>,
    rows: usize,
) -> Result<Prediction, String> {
    if rows < BLOCKING_ROWS {
        return predict(model, columns);
    }
    let model = model.clone();
    tokio::task::spawn_blocking(move || predict(&model, columns))
        .await
        .map_err(|e| format!("the scoring task failed: {e}"))?
}

/// Loads an ONNX model file.
pub fn load_model(path: &Path) -> Result<Arc<Model>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let model = Model::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Arc::new(model))
}

/// Class labels as the strings used in responses (`"0"`, `"1"`, `"yes"`).
pub fn class_names(classes: &ClassLabels) -> Vec<String> {
    match classes {
        ClassLabels::Int(v) => v.iter().map(|c| c.to_string()).collect(),
        ClassLabels::Str(v) => v.clone(),
    }
}
