//! Scoring a batch of parsed requests: enrich, convert, run the model.
//!
//! Enrichments fill only the model inputs a caller did not send, in declared
//! order. Values from a request, a dataset or a remote lookup go through the
//! same conversion into model inputs, so a prediction with only the key gives
//! bit-identical probabilities to one with every feature sent explicitly.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::StatusCode;

use crate::config::OnMissing;
use crate::dataset::KeyRef;
use crate::error::AppError;
use crate::generations::{
    DispatchBy, Generations, ShadowCopy, ShadowLogRow, key_bucket, random_bucket,
};
use crate::input::Input;
use crate::model::{Column, InputKind};
use crate::remote::{RemoteRow, owned_key};
use crate::service::{
    Enrichment, EnrichmentSource, PredictionEndpoint, RemoteEnrichment, RowData, Service,
};

/// The outcome for one item.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub label: String,
    /// One per class, in `PredictionEndpoint::class_names` order.
    pub probabilities: Vec<f32>,
    /// Model input slots filled by enrichments, in input order.
    pub enriched: Vec<usize>,
    /// The generation that answered (an endpoint with generations).
    pub generation: Option<usize>,
}

/// Which generation answers a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    /// The endpoint's dispatch, per item.
    Dispatch,
    /// The `X-Mesh-Generation` header's (a shadow too); no shadow copy.
    Pin(usize),
}

/// What a request brings besides its features.
#[derive(Debug, Clone, Copy)]
pub struct Call<'c> {
    pub pick: Pick,
    /// Whether the query is in the query log (its shadow lines too).
    pub logged: bool,
    pub request_id: Option<&'c str>,
}

impl Default for Call<'_> {
    fn default() -> Self {
        Call {
            pick: Pick::Dispatch,
            logged: false,
            request_id: None,
        }
    }
}

/// Time spent per phase, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub enrich_us: u64,
    pub predict_us: u64,
}

/// Scores `n` items whose fields are `slots` (row-major, `ep.fields.len()`
/// per item). A whole-request failure (an upstream down, a model fault) is
/// `Err`; per-item problems are per-item `Err`s. With generations, each
/// item is dispatched on its own (items of one generation scored in one
/// batch), counted per generation, and copied to the shadows.
pub async fn score<'a>(
    service: &'a Service,
    ep: &'a PredictionEndpoint,
    slots: &mut [Input<'a>],
    n: usize,
    timing: &mut Timing,
    call: &Call<'_>,
) -> Result<Vec<Result<Scored, AppError>>, AppError> {
    let Some(gens) = &ep.generations else {
        return score_with(service, ep, slots, n, timing, &[], vec![None; n]).await;
    };
    let start = std::time::Instant::now();
    let width = ep.fields.len();
    let single = n == 1;
    let mut chosen = vec![None; n];
    let mut errors: Vec<Option<AppError>> = vec![None; n];
    for item in 0..n {
        let bucket = match (call.pick, gens.dispatch) {
            (Pick::Pin(g), _) => {
                chosen[item] = Some(g);
                continue;
            }
            (Pick::Dispatch, DispatchBy::Random) => random_bucket(),
            (Pick::Dispatch, DispatchBy::Key(slot)) => match &slots[item * width + slot] {
                Input::Str(s) => key_bucket(s.as_bytes()),
                Input::Int(i) => key_bucket(i.to_string().as_bytes()),
                other => {
                    let e = AppError::bad_request(
                        "missing_dispatch_key",
                        format!(
                            "feature `{}` picks the generation: send it as a string or an integer (got {})",
                            ep.fields.name(slot),
                            other.type_name()
                        ),
                    );
                    if single {
                        return Err(e);
                    }
                    errors[item] = Some(item_err(single, item, e));
                    continue;
                }
            },
        };
        chosen[item] = Some(gens.pick(bucket));
    }
    let result = score_with(service, ep, slots, n, timing, &chosen, errors).await;
    // Per generation: requests, errors, latency.
    let elapsed = start.elapsed();
    for (item, g) in chosen.iter().enumerate() {
        let Some(g) = *g else { continue };
        let stats = &gens.list[g].stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.latency.observe(elapsed);
        if !matches!(&result, Ok(r) if r[item].is_ok()) {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut results = result?;
    for (r, g) in results.iter_mut().zip(&chosen) {
        if let Ok(scored) = r {
            scored.generation = *g;
        }
    }
    if call.pick == Pick::Dispatch && gens.has_shadows() {
        shadow(ep, gens, slots, &results, call);
    }
    Ok(results)
}

/// Copies the enriched features of the answered items, with their
/// answers, to the endpoint's shadows.
fn shadow(
    ep: &PredictionEndpoint,
    gens: &Generations,
    slots: &[Input<'_>],
    results: &[Result<Scored, AppError>],
    call: &Call<'_>,
) {
    let rows = results.iter().filter(|r| r.is_ok()).count();
    if rows == 0 {
        return;
    }
    gens.shadow(rows, || {
        let width = ep.fields.len();
        let answered: Vec<(usize, &Scored)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|s| (i, s)))
            .collect();
        let columns = ep
            .inputs
            .iter()
            .enumerate()
            .map(|(slot, spec)| {
                column(
                    spec.kind,
                    answered
                        .iter()
                        .map(|&(item, _)| &slots[item * width + slot]),
                )
            })
            .collect();
        let logged = call.logged.then(|| {
            answered
                .iter()
                .map(|&(item, scored)| ShadowLogRow {
                    key: ep
                        .log_key_slot
                        .map(|k| crate::query_log::input_json(&slots[item * width + k])),
                    request_id: call.request_id.map(str::to_owned),
                    served_by: scored
                        .generation
                        .map_or_else(String::new, |g| gens.list[g].name.clone()),
                })
                .collect()
        });
        ShadowCopy {
            columns,
            rows: answered.len(),
            served_probabilities: answered
                .iter()
                .flat_map(|(_, s)| s.probabilities.iter().copied())
                .collect(),
            served_labels: answered.iter().map(|(_, s)| s.label.clone()).collect(),
            logged,
        }
    });
}

/// [`score`] with each item's generation chosen (`chosen[item]`, or the
/// endpoint's model when `chosen` is empty or `None`) and the errors of the
/// dispatch.
async fn score_with<'a>(
    service: &'a Service,
    ep: &'a PredictionEndpoint,
    slots: &mut [Input<'a>],
    n: usize,
    timing: &mut Timing,
    chosen: &[Option<usize>],
    mut errors: Vec<Option<AppError>>,
) -> Result<Vec<Result<Scored, AppError>>, AppError> {
    let width = ep.fields.len();
    let mut enriched = vec![false; n * ep.inputs.len()];
    let single = n == 1;

    // Per remote enrichment, per item: the row once its upstream was asked.
    let mut fetched: Vec<Option<Vec<Option<RemoteRow>>>> = vec![None; ep.enrichments.len()];
    let t = std::time::Instant::now();
    for (e, en) in ep.enrichments.iter().enumerate() {
        // Items that need this enrichment, with their keys.
        let mut wanted: Vec<usize> = Vec::new();
        for (item, error) in errors.iter_mut().enumerate() {
            if error.is_some() || !en.applies(generation_of(chosen, item), &ep.own_enrichments) {
                continue;
            }
            let row = &slots[item * width..(item + 1) * width];
            let Some(&(missing, _)) = en
                .targets
                .iter()
                .find(|&&(slot, _)| row[slot] == Input::Absent)
            else {
                continue;
            };
            match &row[en.key_slot] {
                Input::Str(_) | Input::Int(_) => wanted.push(item),
                Input::Absent | Input::Null => {
                    *error = Some(item_err(
                        single,
                        item,
                        AppError::bad_request(
                            "missing_feature",
                            format!(
                                "missing feature `{}`: send it, or send `{}` to fill it from {}",
                                ep.fields.name(missing),
                                ep.fields.name(en.key_slot),
                                en.describe
                            ),
                        ),
                    ))
                }
                other => {
                    *error = Some(item_err(
                        single,
                        item,
                        AppError::bad_request(
                            "invalid_feature",
                            format!(
                                "feature `{}` must be a string or an integer key, got {}",
                                ep.fields.name(en.key_slot),
                                other.type_name()
                            ),
                        ),
                    ))
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        match &en.source {
            EnrichmentSource::Table(table) => {
                for &item in &wanted {
                    let base = item * width;
                    let found = {
                        let key = slot_key(&slots[base + en.key_slot]);
                        match table.fetch(key).await {
                            Ok(found) => found,
                            Err(e) if single => return Err(e),
                            Err(e) => {
                                errors[item] = Some(item_err(single, item, e));
                                continue;
                            }
                        }
                    };
                    match found {
                        Some(row) => {
                            for &(slot, col) in &en.targets {
                                if slots[base + slot] == Input::Absent {
                                    slots[base + slot] = row_input(&row, col);
                                    enriched[item * ep.inputs.len() + slot] = true;
                                }
                            }
                        }
                        None => {
                            if let Err(e) = no_row(ep, en, slots, &mut enriched, item) {
                                errors[item] = Some(item_err(single, item, e));
                            }
                        }
                    }
                }
            }
            EnrichmentSource::Remote(_) => {
                if fetched[e].is_none() {
                    fetch_upstream(service, ep, e, slots, &errors, chosen, &mut fetched).await?;
                }
                for &item in &wanted {
                    let base = item * width;
                    // Fetched with the group for every item that needed it.
                    let Some(row) = fetched[e].as_ref().and_then(|rows| rows[item].clone()) else {
                        return Err(AppError::internal(format_args!(
                            "{}: item {item} was not fetched",
                            en.describe
                        )));
                    };
                    match row {
                        Some(map) => {
                            for &(slot, col) in &en.targets {
                                if slots[base + slot] != Input::Absent {
                                    continue;
                                }
                                let Some(value) = map.get(&en.columns[col]) else {
                                    if en.optional_columns {
                                        continue;
                                    }
                                    errors[item] = Some(item_err(
                                        single,
                                        item,
                                        AppError::new(
                                            StatusCode::BAD_GATEWAY,
                                            "upstream_error",
                                            format!(
                                                "{} returned no column `{}`",
                                                en.describe, en.columns[col]
                                            ),
                                        ),
                                    ));
                                    break;
                                };
                                slots[base + slot] = Input::from_json(value);
                                enriched[item * ep.inputs.len() + slot] = true;
                            }
                        }
                        None => {
                            if let Err(e) = no_row(ep, en, slots, &mut enriched, item) {
                                errors[item] = Some(item_err(single, item, e));
                            }
                        }
                    }
                }
            }
        }
    }
    timing.enrich_us = t.elapsed().as_micros() as u64;

    // Validate every model input of every remaining item.
    for (item, error) in errors.iter_mut().enumerate() {
        if error.is_some() {
            continue;
        }
        let row = &slots[item * width..(item + 1) * width];
        for (slot, spec) in ep.inputs.iter().enumerate() {
            if let Err(e) = check(&row[slot], spec.kind, &spec.name) {
                *error = Some(item_err(single, item, e));
                break;
            }
        }
    }
    if single && let Some(e) = errors[0].take() {
        return Err(e);
    }
    let ok: Vec<usize> = (0..n).filter(|&i| errors[i].is_none()).collect();

    let t = std::time::Instant::now();
    let mut results: Vec<Result<Scored, AppError>> = errors
        .into_iter()
        .map(|e| {
            // Items without an error are all overwritten below.
            Err(e.unwrap_or_else(|| {
                AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "not scored")
            }))
        })
        .collect();
    if chosen.is_empty() && !ok.is_empty() {
        predict_group(ep, &ep.model, slots, &ok, &enriched, single, &mut results).await?;
    }
    // With generations, the items of one generation are scored in one batch.
    let mut groups: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
    for &item in ok.iter().filter(|_| !chosen.is_empty()) {
        let g = chosen.get(item).copied().flatten();
        match groups.iter_mut().find(|(k, _)| *k == g) {
            Some((_, items)) => items.push(item),
            None => groups.push((g, vec![item])),
        }
    }
    for (g, items) in &groups {
        let model = match (g, &ep.generations) {
            (Some(g), Some(gens)) => &gens.list[*g].model,
            _ => &ep.model,
        };
        predict_group(ep, model, slots, items, &enriched, single, &mut results).await?;
    }
    timing.predict_us = t.elapsed().as_micros() as u64;
    if single && let Some(Err(e)) = results.first() {
        return Err(e.clone());
    }
    Ok(results)
}

/// Scores `items` with `model` into `results`.
async fn predict_group(
    ep: &PredictionEndpoint,
    model: &Arc<crate::model::Model>,
    slots: &[Input<'_>],
    items: &[usize],
    enriched: &[bool],
    single: bool,
    results: &mut [Result<Scored, AppError>],
) -> Result<(), AppError> {
    let width = ep.fields.len();
    let columns: Vec<Column> = ep
        .inputs
        .iter()
        .enumerate()
        .map(|(slot, spec)| {
            column(
                spec.kind,
                items.iter().map(|&item| &slots[item * width + slot]),
            )
        })
        .collect();
    let prediction = crate::scoring::predict_rows(model, columns, items.len())
        .await
        .map_err(|e| {
            AppError::internal(format_args!("endpoint `{}`: model failed: {e}", ep.name))
        })?;
    if prediction.labels.len() != items.len()
        || prediction.classes != ep.class_names.len()
        || prediction.probabilities.len() != items.len() * ep.class_names.len()
    {
        return Err(AppError::internal(format_args!(
            "endpoint `{}`: model returned {} rows of {} classes for {} rows of {} classes",
            ep.name,
            prediction.labels.len(),
            prediction.classes,
            items.len(),
            ep.class_names.len()
        )));
    }
    for (k, &item) in items.iter().enumerate() {
        let probabilities = prediction.probabilities_of(k).to_vec();
        let enriched_slots: Vec<usize> = (0..ep.inputs.len())
            .filter(|&s| enriched[item * ep.inputs.len() + s])
            .collect();
        results[item] = if probabilities.iter().all(|p| p.is_finite()) {
            Ok(Scored {
                label: prediction.labels[k].to_string(),
                probabilities,
                enriched: enriched_slots,
                generation: None,
            })
        } else {
            let nulls: Vec<&str> = (0..ep.inputs.len())
                .filter(|&s| slots[item * width + s] == Input::Null)
                .map(|s| ep.fields.name(s))
                .collect();
            Err(item_err(
                single,
                item,
                AppError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "undefined_prediction",
                    format!(
                        "the model gives no probabilities for missing values (null features: {})",
                        nulls.join(", ")
                    ),
                ),
            ))
        };
    }
    Ok(())
}

/// The generation chosen for `item` (none without generations).
fn generation_of(chosen: &[Option<usize>], item: usize) -> Option<usize> {
    chosen.get(item).copied().flatten()
}

/// Asks the upstream of remote enrichment `first`, once, for the rows of it
/// and of every later enrichment reading the same upstream, for every item
/// still missing some of their targets (what later enrichments will want is
/// a subset: enrichments only fill). Cached rows are not asked again. One
/// item: a coalesced request; a batch: one request.
async fn fetch_upstream(
    service: &Service,
    ep: &PredictionEndpoint,
    first: usize,
    slots: &[Input<'_>],
    errors: &[Option<AppError>],
    chosen: &[Option<usize>],
    fetched: &mut [Option<Vec<Option<RemoteRow>>>],
) -> Result<(), AppError> {
    let EnrichmentSource::Remote(lead) = &ep.enrichments[first].source else {
        return Ok(());
    };
    let upstream = &lead.upstream;
    let members: Vec<(usize, &RemoteEnrichment)> = ep
        .enrichments
        .iter()
        .enumerate()
        .skip(first)
        .filter_map(|(j, en)| match &en.source {
            EnrichmentSource::Remote(r) if Arc::ptr_eq(&r.upstream, upstream) => Some((j, r)),
            _ => None,
        })
        .collect();
    let n = errors.len();
    let width = ep.fields.len();
    for &(j, _) in &members {
        fetched[j] = Some(vec![None; n]);
    }
    // One key field per upstream: one key slot.
    let key_slot = ep.enrichments[first].key_slot;
    let mut masks = vec![0u64; n];
    for (item, mask) in masks.iter_mut().enumerate() {
        let row = &slots[item * width..(item + 1) * width];
        let (None, Some(key)) = (&errors[item], row[key_slot].as_key()) else {
            continue;
        };
        for &(j, remote) in &members {
            let en = &ep.enrichments[j];
            let missing = en.applies(generation_of(chosen, item), &ep.own_enrichments)
                && en
                    .targets
                    .iter()
                    .any(|&(slot, _)| row[slot] == Input::Absent);
            if !missing {
                continue;
            }
            if let Some(hit) = remote
                .cache
                .as_ref()
                .and_then(|c| c.cached(&owned_key(key)))
            {
                if let Some(rows) = fetched[j].as_mut() {
                    rows[item] = Some(hit);
                }
                continue;
            }
            *mask |= 1 << remote.endpoint;
        }
    }
    let asked: Vec<usize> = (0..n).filter(|&item| masks[item] != 0).collect();
    let keys: Vec<KeyRef<'_>> = asked
        .iter()
        .map(|&item| slot_key(&slots[item * width + key_slot]))
        .collect();
    let (rows, union) = match keys.as_slice() {
        [] => return Ok(()),
        &[key] => {
            let mask = masks[asked[0]];
            let rows = upstream.fetch_one(&service.http, mask, key).await?;
            (Fetched::One(rows), mask)
        }
        keys => {
            let union = asked.iter().fold(0, |m, &item| m | masks[item]);
            (
                Fetched::Many(upstream.fetch_many(&service.http, union, keys).await?),
                union,
            )
        }
    };
    for (k, (&item, &key)) in asked.iter().zip(&keys).enumerate() {
        // The item's rows: the endpoints of `union`, in endpoint order.
        let item_rows = match &rows {
            Fetched::One(rows) => rows.as_slice(),
            Fetched::Many(rows) => rows[k].as_slice(),
        };
        for &(j, remote) in &members {
            let bit = 1u64 << remote.endpoint;
            if union & bit == 0 {
                continue;
            }
            // Endpoint `remote.endpoint`'s place among those of `union`.
            let at = (union & (bit - 1)).count_ones() as usize;
            let (Some(rows), Some(row)) = (fetched[j].as_mut(), item_rows.get(at)) else {
                continue;
            };
            if rows[item].is_none() {
                rows[item] = Some(row.clone());
                if masks[item] & bit != 0
                    && let Some(cache) = &remote.cache
                {
                    cache.store(owned_key(key), row.clone());
                }
            }
        }
    }
    Ok(())
}

/// What an upstream answered: one key's rows (shared with the requests
/// coalesced with it), or a batch's, per key.
enum Fetched {
    One(Arc<Vec<RemoteRow>>),
    Many(Vec<Vec<RemoteRow>>),
}

fn item_err(single: bool, item: usize, mut e: AppError) -> AppError {
    if !single {
        e.message = format!("item {item}: {}", e.message);
    }
    e
}

fn slot_key<'s>(input: &'s Input<'_>) -> KeyRef<'s> {
    input.as_key().unwrap_or(KeyRef::Str(""))
}

fn row_input<'a>(row: &RowData<'a>, col: usize) -> Input<'a> {
    match row {
        RowData::Memory(ds, r) => Input::from_value(ds.value(*r, col)),
        // A snapshot may be swapped out, a fetched row dropped, after this
        // call: own the text.
        RowData::Snapshot(..) | RowData::Owned(_) => owned_input(row.value(col)),
    }
}

fn owned_input(value: crate::dataset::ValueRef<'_>) -> Input<'static> {
    use crate::dataset::ValueRef;
    match value {
        ValueRef::Str(s) => Input::Str(Cow::Owned(s.to_string())),
        ValueRef::Int(i) => Input::Int(i),
        ValueRef::Float(f) => Input::Num(f),
        ValueRef::Bool(b) => Input::Bool(b),
        ValueRef::Null => Input::Null,
    }
}

/// `en` found no row for `item`: a 404 under `on_missing: error`, else the
/// targets still missing become null.
fn no_row(
    ep: &PredictionEndpoint,
    en: &Enrichment,
    slots: &mut [Input<'_>],
    enriched: &mut [bool],
    item: usize,
) -> Result<(), AppError> {
    let base = item * ep.fields.len();
    match en.on_missing {
        OnMissing::Error => Err(AppError::not_found(
            "not_found",
            format!(
                "no row with `{}` = {} in {}",
                ep.fields.name(en.key_slot),
                slot_key(&slots[base + en.key_slot]),
                en.describe
            ),
        )),
        OnMissing::Null => {
            for &(slot, _) in &en.targets {
                if slots[base + slot] == Input::Absent {
                    slots[base + slot] = Input::Null;
                    enriched[item * ep.inputs.len() + slot] = true;
                }
            }
            Ok(())
        }
    }
}

/// Whether `input` converts to a model input of `kind`.
pub fn check(input: &Input<'_>, kind: InputKind, name: &str) -> Result<(), AppError> {
    let wrong = |expected: &str| {
        Err(AppError::bad_request(
            "invalid_feature",
            format!(
                "feature `{name}` must be {expected}, got {}",
                input.type_name()
            ),
        ))
    };
    match (kind, input) {
        (_, Input::Absent) => Err(AppError::bad_request(
            "missing_feature",
            format!("missing feature `{name}`"),
        )),
        (
            InputKind::F32 | InputKind::F64,
            Input::Int(_) | Input::Num(_) | Input::Bool(_) | Input::Null,
        ) => Ok(()),
        (InputKind::F32 | InputKind::F64, _) => wrong("a number"),
        (InputKind::I64, Input::Int(_) | Input::Bool(_)) => Ok(()),
        (InputKind::I64, Input::Num(v)) if v.fract() == 0.0 && v.abs() < 9.2e18 => Ok(()),
        (InputKind::I64, _) => wrong("an integer"),
        (InputKind::Str, Input::Str(_) | Input::Int(_) | Input::Null) => Ok(()),
        (InputKind::Str, _) => wrong("a string"),
    }
}

/// The value as a float (after [`check`]); a missing value is NaN.
fn as_f64(input: &Input<'_>) -> f64 {
    match input {
        Input::Int(i) => *i as f64,
        Input::Num(v) => *v,
        Input::Bool(b) => f64::from(u8::from(*b)),
        _ => f64::NAN,
    }
}

/// Builds one model column from checked inputs.
pub fn column<'i, 'a: 'i>(
    kind: InputKind,
    values: impl ExactSizeIterator<Item = &'i Input<'a>>,
) -> Column {
    match kind {
        InputKind::F32 => Column::F32(values.map(|v| as_f64(v) as f32).collect()),
        InputKind::F64 => Column::F64(values.map(as_f64).collect()),
        InputKind::I64 => Column::I64(
            values
                .map(|v| match v {
                    Input::Int(i) => *i,
                    Input::Bool(b) => i64::from(*b),
                    Input::Num(f) => *f as i64,
                    _ => 0,
                })
                .collect(),
        ),
        InputKind::Str => Column::Str(
            values
                .map(|v| match v {
                    Input::Str(s) => s.to_string(),
                    Input::Int(i) => i.to_string(),
                    _ => String::new(),
                })
                .collect(),
        ),
    }
}
