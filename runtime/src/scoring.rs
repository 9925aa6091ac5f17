//! The server's view of a model: a classifier with named, typed inputs.
//!
//! The server talks to models only through [`Classifier`], so request handling
//! can be tested with a stand-in and the engine in `model` stays swappable.

use std::path::Path;
use std::sync::Arc;

use crate::model::{Batch, ClassLabels, Column, InputSpec, Model, Prediction};

/// A loaded classifier.
pub trait Classifier: Send + Sync + 'static {
    /// Graph inputs, in batch column order.
    fn inputs(&self) -> &[InputSpec];
    /// Class labels, in probability column order.
    fn classes(&self) -> &ClassLabels;
    /// Runs one batch (a column per input, in `inputs()` order).
    fn predict(&self, columns: Vec<Column>) -> Result<Prediction, String>;
}

impl Classifier for Model {
    fn inputs(&self) -> &[InputSpec] {
        Model::inputs(self)
    }
    fn classes(&self) -> &ClassLabels {
        Model::classes(self)
    }
    fn predict(&self, columns: Vec<Column>) -> Result<Prediction, String> {
        let batch = Batch::new(columns).map_err(|e| e.to_string())?;
        Model::predict(self, &batch).map_err(|e| e.to_string())
    }
}

/// Batches of at least this many rows are scored on the blocking pool, so a
/// large batch (a 1,000-row forest takes milliseconds) never holds one of
/// the few worker threads that serve every other request; smaller ones run
/// in place, where the hand-off would cost more than the work.
pub const BLOCKING_ROWS: usize = 64;

/// [`Classifier::predict`] for `rows` rows, on the blocking pool when the
/// batch is large (see [`BLOCKING_ROWS`]).
pub async fn predict_rows(
    model: &Arc<dyn Classifier>,
    columns: Vec<Column>,
    rows: usize,
) -> Result<Prediction, String> {
    if rows < BLOCKING_ROWS {
        return model.predict(columns);
    }
    let model = model.clone();
    tokio::task::spawn_blocking(move || model.predict(columns))
        .await
        .map_err(|e| format!("the scoring task failed: {e}"))?
}

/// Loads an ONNX model file.
pub fn load_model(path: &Path) -> Result<Arc<dyn Classifier>, String> {
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
