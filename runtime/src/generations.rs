//! Generations of a prediction endpoint: several models side by side, a
//! split of the traffic between the serving ones, and shadows that score a
//! copy of it off the request path.
//!
//! **Dispatch.** A request falls into one of [`BUCKETS`] buckets; the
//! serving generations own consecutive bucket ranges in declaration order,
//! `weight × 100` buckets each. With `dispatch = random` the bucket is drawn
//! from a per-thread xorshift generator (no lock). With `dispatch = {key}`
//! it is [`key_bucket`] of the key feature's canonical text (a string as
//! is, an integer in decimal): FNV-1a 64 of its UTF-8 bytes, then the
//! `fmix64` finalizer of MurmurHash3, modulo 10,000 — fixed constants, no
//! per-process seed, so a key lands in the same bucket in every process and
//! every version. Moving weight between two neighbours therefore moves only
//! the buckets at their border: 90/10 → 80/20 moves `[8000, 9000)`.
//!
//! **Split.** The weights in force are an [`ArcSwap`]ed [`Split`], replaced
//! whole by a reload of the `split_file` ([`watch_split_file`]).
//!
//! **Shadows.** A shadow generation has a bounded queue
//! ([`Limits::shadow_queue`](crate::config::Limits) copies) drained by an
//! OS thread of its own at `SCHED_IDLE` priority (nice 19 where that is
//! refused), so it only takes CPU the serving path leaves. A full queue
//! drops the copy and counts its predictions; the caller never waits, and
//! when every shadow's queue is full the serving side does not even build
//! the copy (a saturated service would otherwise build and free one per
//! request for nothing). Besides, the
//! thread keeps within a CPU budget ([`Limits::shadow_cpu`](crate::config::Limits),
//! a share of one core): after each batch it reads its own CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) and sleeps until its duty cycle is back
//! within the share. And it starts a batch only while the machine has had
//! a core to spare besides that share over the last [`IDLE_WINDOW`]
//! ([`SPARE_CORES`] + the share idle in `/proc/stat`, which its own work
//! lowers). Measured on the 2-core VM of the benchmark, any busy
//! idle-priority thread, even a bare loop, doubles the serving p99 of a
//! saturated runtime: idle priority alone does not protect the tail, so a
//! busy machine gets no shadow work but one chunk ([`SHADOW_CHUNK_ROWS`]
//! rows) every [`SHUT_AT_MOST`], and the other copies are dropped and
//! counted instead.
//!
//! Finally it scores [`SHADOW_CHUNK_ROWS`] rows at a time, each chunk
//! started when the process is answering no request ([`Serving`]): on the
//! benchmark's VM a shadow busy while requests are answered raised the
//! paced serving p99 by about 30% (an idle-priority thread is preempted on
//! the same core, but not on the other one, whose caches and memory
//! bandwidth it still shares), and scoring between requests took that to
//! within the noise. A process never between requests still scores a chunk
//! a [`SHUT_AT_MOST`].
//!
//! A thread at idle priority can be descheduled for long stretches while
//! runnable, so it shares no lock with the request path (a serving thread
//! waiting on a lock it holds would wait as long — priority inversion):
//! - it never blocks in the queue's `recv` (a waiting receiver makes every
//!   `try_send` of a serving thread take the channel's waker lock); it
//!   polls with `try_recv` and sleeps as [`crate::lines::Backoff`] says
//!   when the queue is empty, and the query-log writer it sends lines to polls too
//!   ([`crate::lines`]);
//! - it does not free the copies serving threads allocated (a `free` into
//!   another thread's malloc arena takes that arena's lock): it hands them
//!   back on a second queue, and the serving side drops a few of them on
//!   each [`Generations::shadow`] call;
//! - its model is its own (models keep no shared state while scoring).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::SplitFile;
use crate::lines::Backoff;
use crate::metrics::{Histogram, esc};
use crate::model::{Batch, Column, Model};
use crate::query_log::{Probabilities, QueryLog};

/// Hash buckets of a split: weights are percent, so 100 buckets per point.
pub const BUCKETS: u32 = 10_000;

/// Rows a shadow thread scores at once when copies are waiting.
const SHADOW_BATCH_ROWS: usize = 256;

/// How often a shadow thread looks at the machine's idle time, and how long
/// it waits when there was too little.
pub const IDLE_WINDOW: Duration = Duration::from_millis(100);

/// Idle cores, besides its CPU share, a shadow thread needs to see to start
/// a batch.
pub const SPARE_CORES: f64 = 1.0;

/// Longest the idle gate keeps a shadow from scoring.
pub const SHUT_AT_MOST: Duration = Duration::from_secs(1);

/// Rows a shadow scores at once between requests: short enough (a slow
/// forest: about 0.1 ms) that a request arriving meanwhile finds little of
/// it left.
const SHADOW_CHUNK_ROWS: usize = 4;

/// How often a shadow waiting for a moment between requests looks again.
const BETWEEN_POLL: Duration = Duration::from_micros(250);

/// Requests the process is answering now (see [`Serving`]).
static SERVING: AtomicUsize = AtomicUsize::new(0);

/// Whether a shadow thread runs in this process (set before any request is
/// served): without one, requests are not counted.
static SHADOWS: AtomicBool = AtomicBool::new(false);

/// One request being answered, counted while it lives: a shadow starts a
/// chunk only when none is (or after [`SHUT_AT_MOST`] without a moment
/// between requests). A guard, so a request given up midway is uncounted too.
pub struct Serving(());

impl Serving {
    /// `None` (nothing counted) in a process without shadows.
    pub fn enter() -> Option<Serving> {
        if !SHADOWS.load(Ordering::Relaxed) {
            return None;
        }
        SERVING.fetch_add(1, Ordering::Relaxed);
        Some(Serving(()))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until no request is being answered, or [`SHUT_AT_MOST`] has
/// passed since the last chunk that did not wait for it.
fn between_requests(last: &mut Instant) {
    while SERVING.load(Ordering::Relaxed) > 0 {
        if last.elapsed() >= SHUT_AT_MOST {
            *last = Instant::now();
            return;
        }
        std::thread::sleep(BETWEEN_POLL);
    }
    *last = Instant::now();
}

/// Spent copies the serving side drops per [`Generations::shadow`] call:
/// more than the one copy a call hands out, so the hand-back queue drains.
const SPENT_DROPS_PER_CALL: usize = 4;

/// The bucket of a dispatch key's canonical text (see the module docs).
pub fn key_bucket(text: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in text {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MurmurHash3 fmix64: spreads FNV's weak low bits before the modulo.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % u64::from(BUCKETS)) as u32
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let local = 0u8;
    // The address of a local differs per thread.
    (nanos ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// A uniform draw in `0..1` from the thread's xorshift64* generator.
pub fn random_unit() -> f64 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// A random bucket (`dispatch = random`).
pub fn random_bucket() -> u32 {
    ((random_unit() * f64::from(BUCKETS)) as u32).min(BUCKETS - 1)
}

/// The weights in force: `ends[i]` is the first bucket after serving
/// generation `serving[i]`'s range.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    weights: Vec<u32>,
    ends: Vec<u32>,
}

impl Split {
    fn new(weights: Vec<u32>) -> Split {
        let mut end = 0;
        let ends = weights
            .iter()
            .map(|w| {
                end += w * (BUCKETS / 100);
                end
            })
            .collect();
        Split { weights, ends }
    }
}

/// Counters of one generation (atomics: no lock on the request path).
#[derive(Default)]
pub struct GenerationStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub latency: Histogram,
    /// Shadows: predictions (rows of the copies) compared, compared with the
    /// same label, and dropped unscored.
    pub compared: AtomicU64,
    pub agreed: AtomicU64,
    pub dropped: AtomicU64,
    /// Sum over compared predictions of the mean absolute difference of the
    /// class probabilities, as `f64` bits (one writer: the shadow thread).
    abs_diff_sum: AtomicU64,
    /// Shadows: CPU time of the scoring thread, in nanoseconds.
    pub cpu_nanos: AtomicU64,
    /// Shadows: copies waiting in the queue (added after a copy is queued,
    /// taken when the thread takes it, so it may dip below 0 in between).
    pub queued: AtomicI64,
}

impl GenerationStats {
    pub fn abs_diff_sum(&self) -> f64 {
        f64::from_bits(self.abs_diff_sum.load(Ordering::Relaxed))
    }
}

/// One generation of an endpoint.
pub struct Generation {
    pub name: String,
    pub model: Arc<Model>,
    pub shadow: bool,
    pub stats: Arc<GenerationStats>,
    queue: Option<SyncSender<Arc<ShadowCopy>>>,
}

/// How the serving generation is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DispatchBy {
    Random,
    /// The request field in this slot (read as sent, before enrichment).
    Key(usize),
}

/// The generations of one prediction endpoint.
pub struct Generations {
    pub endpoint: String,
    /// In declaration order.
    pub list: Vec<Generation>,
    pub dispatch: DispatchBy,
    /// Indices of the serving generations, in declaration order.
    serving: Vec<usize>,
    split: ArcSwap<Split>,
    /// Copies the shadows are done with, to be freed on the serving side
    /// (see the module docs). Only serving threads take this lock, and only
    /// with `try_lock`.
    spent: Mutex<Receiver<Arc<ShadowCopy>>>,
    /// Copies each shadow's queue holds.
    queue_capacity: usize,
}

/// What a shadow scores: the enriched features of the items one request's
/// serving generations answered, and their answers.
pub struct ShadowCopy {
    pub columns: Vec<Column>,
    pub rows: usize,
    /// Row-major `rows × classes`.
    pub served_probabilities: Vec<f32>,
    pub served_labels: Vec<String>,
    /// Per row, when the query is logged: what the shadow's line carries.
    pub logged: Option<Vec<ShadowLogRow>>,
}

/// The query-log context of one shadowed row.
pub struct ShadowLogRow {
    pub key: Option<serde_json::Value>,
    pub request_id: Option<String>,
    pub served_by: String,
}

/// A generation as declared, its model loaded.
pub struct Declared {
    pub name: String,
    pub model: Arc<Model>,
    pub shadow: bool,
    /// `None` when the split file gives it.
    pub weight: Option<u32>,
    /// A shadow's own CPU share, in place of the endpoint's default.
    pub cpu_share: Option<f64>,
}

impl Generations {
    /// The generations of `endpoint`; a shadow's thread starts here, within
    /// `limits` (its own CPU share, if it has one, in place of theirs).
    pub fn new(
        endpoint: &str,
        declared: Vec<Declared>,
        dispatch: DispatchBy,
        class_names: &[String],
        limits: ShadowLimits,
        log: Option<QueryLog>,
    ) -> std::io::Result<Generations> {
        let serving: Vec<usize> = (0..declared.len())
            .filter(|&i| !declared[i].shadow)
            .collect();
        let weights = serving
            .iter()
            .map(|&i| declared[i].weight.unwrap_or(0))
            .collect();
        let shadows = declared.iter().filter(|d| d.shadow).count();
        // Room for every copy the shadows can hold: queued, in a batch, or
        // waiting to be handed back.
        let (give_back, spent) = sync_channel(shadows * (2 * limits.queue + SHADOW_BATCH_ROWS));
        let mut list = Vec::with_capacity(declared.len());
        for d in declared {
            let stats = Arc::new(GenerationStats::default());
            let queue = if d.shadow {
                let (send, receive) = sync_channel(limits.queue);
                let shadow = ShadowThread {
                    endpoint: endpoint.to_string(),
                    generation: d.name.clone(),
                    model: d.model.clone(),
                    classes: class_names.to_vec(),
                    stats: stats.clone(),
                    log: log.clone(),
                    cpu_share: d.cpu_share.unwrap_or(limits.cpu_share),
                    idle_gate: limits.idle_gate,
                };
                let give_back = give_back.clone();
                SHADOWS.store(true, Ordering::Relaxed);
                std::thread::Builder::new()
                    .name(format!("shadow-{}", d.name))
                    .spawn(move || shadow.run(receive, give_back))?;
                Some(send)
            } else {
                None
            };
            list.push(Generation {
                name: d.name,
                model: d.model,
                shadow: d.shadow,
                stats,
                queue,
            });
        }
        Ok(Generations {
            endpoint: endpoint.to_string(),
            list,
            dispatch,
            serving,
            split: ArcSwap::from_pointee(Split::new(weights)),
            spent: Mutex::new(spent),
            queue_capacity: limits.queue,
        })
    }

    /// The serving generation of `bucket` under the split in force.
    pub fn pick(&self, bucket: u32) -> usize {
        let split = self.split.load();
        let at = split.ends.partition_point(|&end| end <= bucket);
        self.serving[at.min(self.serving.len() - 1)]
    }

    /// The generation named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|g| g.name == name)
    }

    /// Every generation's name, for a message.
    pub fn names(&self) -> String {
        self.list
            .iter()
            .map(|g| format!("`{}`", g.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn has_shadows(&self) -> bool {
        self.list.iter().any(|g| g.shadow)
    }

    /// The split `weights` would make, or why it is not valid for this
    /// endpoint: every serving generation, no other name, summing to 100.
    pub fn split_of(&self, weights: &BTreeMap<String, u32>) -> Result<Split, String> {
        let at = &self.endpoint;
        for name in weights.keys() {
            match self.position(name) {
                None => {
                    return Err(format!(
                        "endpoint `{at}`: no generation `{name}` (generations: {})",
                        self.names()
                    ));
                }
                Some(i) if self.list[i].shadow => {
                    return Err(format!(
                        "endpoint `{at}`: generation `{name}` is a shadow: it takes no weight"
                    ));
                }
                Some(_) => {}
            }
        }
        let mut out = Vec::with_capacity(self.serving.len());
        for &i in &self.serving {
            let name = &self.list[i].name;
            let Some(&w) = weights.get(name) else {
                return Err(format!(
                    "endpoint `{at}`: no weight for generation `{name}`"
                ));
            };
            out.push(w);
        }
        let total: u64 = out.iter().map(|&w| u64::from(w)).sum();
        if total != 100 {
            return Err(format!(
                "endpoint `{at}`: the weights sum to {total}, not 100"
            ));
        }
        Ok(Split::new(out))
    }

    fn set_split(&self, split: Split) {
        self.split.store(Arc::new(split));
    }

    /// `(generation, weight)` of the serving generations under the split in force.
    pub fn weights(&self) -> Vec<(&str, u32)> {
        let split = self.split.load();
        self.serving
            .iter()
            .zip(&split.weights)
            .map(|(&i, &w)| (self.list[i].name.as_str(), w))
            .collect()
    }

    /// Hands the copy of `rows` answered predictions that `make` builds to
    /// every shadow's queue; a full queue drops it (its rows counted). When
    /// every queue is full the copy is not built at all: under a load the
    /// shadows cannot keep up with, a request pays for no copy it would
    /// throw away. Frees a few copies the shadows are done with first;
    /// never waits.
    pub fn shadow(&self, rows: usize, make: impl FnOnce() -> ShadowCopy) {
        if let Ok(spent) = self.spent.try_lock() {
            for _ in 0..SPENT_DROPS_PER_CALL {
                if spent.try_recv().is_err() {
                    break;
                }
            }
        }
        let room =
            |g: &Generation| g.stats.queued.load(Ordering::Relaxed) < self.queue_capacity as i64;
        if !self.list.iter().any(|g| g.queue.is_some() && room(g)) {
            for g in self.list.iter().filter(|g| g.queue.is_some()) {
                g.stats.dropped.fetch_add(rows as u64, Ordering::Relaxed);
            }
            return;
        }
        let copy = Arc::new(make());
        for g in &self.list {
            let Some(queue) = &g.queue else { continue };
            match queue.try_send(copy.clone()) {
                Ok(()) => {
                    g.stats.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    g.stats.dropped.fetch_add(rows as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What holds the shadows of an endpoint back.
#[derive(Clone, Copy, Debug)]
pub struct ShadowLimits {
    /// Copies each may have waiting.
    pub queue: usize,
    /// The share of one core each may use, unless its generation says.
    pub cpu_share: f64,
    /// Whether they wait for the machine's idle time.
    pub idle_gate: bool,
}

/// A shadow's scoring thread.
struct ShadowThread {
    endpoint: String,
    generation: String,
    model: Arc<Model>,
    classes: Vec<String>,
    stats: Arc<GenerationStats>,
    log: Option<QueryLog>,
    /// The share of one core it may use.
    cpu_share: f64,
    /// Whether it waits for the machine's idle time (see [`IdleGate`]).
    idle_gate: bool,
}

#[derive(Serialize)]
struct ShadowLine<'a> {
    time: String,
    event: &'static str,
    endpoint: &'a str,
    generation: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a serde_json::Value>,
    prediction: &'a str,
    probabilities: Probabilities<'a>,
    agrees: bool,
    served_by: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl ShadowThread {
    /// Scores what `queue` brings, in batches, until the endpoint is gone;
    /// hands each copy back on `give_back` once scored.
    fn run(self, queue: Receiver<Arc<ShadowCopy>>, give_back: SyncSender<Arc<ShadowCopy>>) {
        let how = lower_priority();
        crate::log::info(format_args!(
            "endpoint `{}`: shadow generation `{}` scores at {how} priority, within {} of a core{}",
            self.endpoint,
            self.generation,
            self.cpu_share,
            if self.idle_gate {
                ", when the machine has a core to spare"
            } else {
                ""
            }
        ));
        let mut budget = Budget::start(self.cpu_share);
        let mut idle = IdleGate::default();
        let mut held: Vec<Arc<ShadowCopy>> = Vec::new();
        let mut open = true;
        let mut backoff = Backoff::default();
        let mut quiet = Instant::now();
        while open {
            let mut copies = Vec::new();
            let mut rows = 0;
            while rows < SHADOW_BATCH_ROWS {
                match queue.try_recv() {
                    Ok(next) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        rows += next.rows;
                        copies.push(next);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if copies.is_empty() {
                if open {
                    backoff.idle();
                }
                continue;
            }
            backoff.reset();
            // The idle gate is asked only with copies to score: an idle
            // service reads no `/proc/stat`.
            let forced = self.idle_gate
                && loop {
                    match idle.open(self.cpu_share) {
                        Gate::Open => break false,
                        Gate::Forced => break true,
                        Gate::Shut => std::thread::sleep(IDLE_WINDOW),
                    }
                };
            if forced {
                // A busy machine: one chunk, the rest dropped (counted).
                let mut kept_rows = 0;
                let kept = copies
                    .iter()
                    .take_while(|c| {
                        let fits = kept_rows == 0 || kept_rows + c.rows <= SHADOW_CHUNK_ROWS;
                        kept_rows += c.rows;
                        fits
                    })
                    .count();
                let dropped: usize = copies[kept..].iter().map(|c| c.rows).sum();
                self.stats
                    .dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                held.extend(copies.drain(kept..));
            }
            // A few rows at a time, each between requests.
            let mut from = 0;
            while from < copies.len() {
                let mut to = from;
                let mut chunk_rows = 0;
                while to < copies.len()
                    && (to == from || chunk_rows + copies[to].rows <= SHADOW_CHUNK_ROWS)
                {
                    chunk_rows += copies[to].rows;
                    to += 1;
                }
                between_requests(&mut quiet);
                self.score(&copies[from..to], chunk_rows);
                from = to;
            }
            // Handed back, not dropped here (see the module docs); a full
            // hand-back queue keeps them for the next round.
            held.append(&mut copies);
            while let Some(copy) = held.pop() {
                match give_back.try_send(copy) {
                    Ok(()) => {}
                    Err(TrySendError::Full(copy)) => {
                        held.push(copy);
                        break;
                    }
                    // The endpoint is gone: nothing serves any more.
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            budget.rest(&self.stats.cpu_nanos);
        }
    }

    fn score(&self, copies: &[Arc<ShadowCopy>], rows: usize) {
        let mut columns: Vec<Column> = copies[0].columns.clone();
        for copy in &copies[1..] {
            for (into, from) in columns.iter_mut().zip(&copy.columns) {
                append(into, from);
            }
        }
        let prediction = Batch::new(columns)
            .map_err(|e| e.to_string())
            .and_then(|b| self.model.predict(&b).map_err(|e| e.to_string()));
        let prediction = match prediction {
            Ok(p) if p.labels.len() == rows && p.classes == self.classes.len() => p,
            Ok(_) | Err(_) => {
                self.stats.errors.fetch_add(rows as u64, Ordering::Relaxed);
                return;
            }
        };
        let classes = self.classes.len();
        let mut diff_sum = self.stats.abs_diff_sum();
        let mut row = 0;
        for copy in copies {
            for r in 0..copy.rows {
                let label = prediction.labels[row].to_string();
                let ours = prediction.probabilities_of(row);
                let theirs = &copy.served_probabilities[r * classes..(r + 1) * classes];
                let diff = ours
                    .iter()
                    .zip(theirs)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .sum::<f64>()
                    / classes.max(1) as f64;
                let agrees = label == copy.served_labels[r];
                diff_sum += diff;
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                self.stats.compared.fetch_add(1, Ordering::Relaxed);
                if agrees {
                    self.stats.agreed.fetch_add(1, Ordering::Relaxed);
                }
                if let (Some(log), Some(logged)) = (&self.log, &copy.logged) {
                    let info = &logged[r];
                    log.send(&ShadowLine {
                        time: crate::log::rfc3339(SystemTime::now()),
                        event: "shadow",
                        endpoint: &self.endpoint,
                        generation: &self.generation,
                        key: info.key.as_ref(),
                        prediction: &label,
                        probabilities: Probabilities {
                            names: &self.classes,
                            values: ours,
                        },
                        agrees,
                        served_by: &info.served_by,
                        request_id: info.request_id.as_deref(),
                    });
                }
                row += 1;
            }
        }
        self.stats
            .abs_diff_sum
            .store(diff_sum.to_bits(), Ordering::Relaxed);
    }
}

/// A thread's CPU budget: a share of one core, kept by sleeping after each
/// batch until CPU time used ÷ wall time since the last rest is within it.
struct Budget {
    share: f64,
    cpu: Duration,
    since: Instant,
}

impl Budget {
    fn start(share: f64) -> Budget {
        Budget {
            share,
            cpu: thread_cpu_time().unwrap_or_default(),
            since: Instant::now(),
        }
    }

    /// Sleeps as long as the work since the last rest requires; stores the
    /// thread's CPU time in `cpu_nanos`. Where a thread's CPU time cannot be
    /// read, the wall time counts as CPU time.
    fn rest(&mut self, cpu_nanos: &AtomicU64) {
        let elapsed = self.since.elapsed();
        let now = thread_cpu_time();
        let used = now.map_or(elapsed, |now| now.saturating_sub(self.cpu));
        let due = used.div_f64(self.share.clamp(f64::MIN_POSITIVE, 1.0));
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if let Some(now) = thread_cpu_time() {
            cpu_nanos.store(now.as_nanos() as u64, Ordering::Relaxed);
            self.cpu = now;
        }
        self.since = Instant::now();
    }
}

/// Whether the machine has had [`SPARE_CORES`] + `share` idle over the
/// last [`IDLE_WINDOW`] (re-read when the window is over; a reading older
/// than two windows is taken again first); shut for
/// [`SHUT_AT_MOST`], it lets one chunk through all the same
/// ([`Gate::Forced`]). Open where the machine's idle time cannot be read.
struct IdleGate {
    last: Option<(Instant, u64)>,
    open: bool,
    shut_since: Option<Instant>,
}

impl Default for IdleGate {
    fn default() -> IdleGate {
        IdleGate {
            last: None,
            open: true,
            shut_since: None,
        }
    }
}

/// What the [`IdleGate`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// The machine has a core to spare.
    Open,
    /// It has not, for [`SHUT_AT_MOST`]: one chunk all the same.
    Forced,
    Shut,
}

impl IdleGate {
    fn open(&mut self, share: f64) -> Gate {
        let now = Instant::now();
        let stale = self
            .last
            .is_none_or(|(at, _)| now.duration_since(at) >= IDLE_WINDOW);
        if stale {
            let Some((idle, per_second)) = machine_idle_ticks() else {
                return Gate::Open;
            };
            let previous = self.last.replace((now, idle));
            match previous {
                // A first reading, or one of long ago (an idle stretch
                // before copies came), says nothing of now: the next does.
                None => return Gate::Shut,
                Some((at, _)) if now.duration_since(at) >= 2 * IDLE_WINDOW => return Gate::Shut,
                Some((at, idle_then)) => {
                    let wall = now.duration_since(at).as_secs_f64();
                    let idle_cores = idle.saturating_sub(idle_then) as f64 / per_second / wall;
                    self.open = idle_cores >= SPARE_CORES + share;
                }
            }
        }
        if self.open {
            self.shut_since = None;
            return Gate::Open;
        }
        // A shadow on a machine never idle still compares a chunk now and
        // then (4 rows a second: 0.16 ms of CPU for the slow benchmark forest).
        let since = *self.shut_since.get_or_insert(now);
        if now.duration_since(since) >= SHUT_AT_MOST {
            self.shut_since = Some(now);
            return Gate::Forced;
        }
        Gate::Shut
    }
}

/// The machine's idle and I/O-wait time in clock ticks (`/proc/stat`), and
/// the ticks per second.
#[cfg(target_os = "linux")]
fn machine_idle_ticks() -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| {
        (
            fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0),
            per_second as f64,
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn machine_idle_ticks() -> Option<(u64, f64)> {
    None
}

/// The calling thread's CPU time (user and system).
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Option<Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing into a valid timespec.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    ok.then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

/// Appends the rows of `from` to `into` (columns of the same input).
fn append(into: &mut Column, from: &Column) {
    match (into, from) {
        (Column::F32(a), Column::F32(b)) => a.extend_from_slice(b),
        (Column::F64(a), Column::F64(b)) => a.extend_from_slice(b),
        (Column::I64(a), Column::I64(b)) => a.extend_from_slice(b),
        (Column::Str(a), Column::Str(b)) => a.extend_from_slice(b),
        _ => {}
    }
}

/// Lowers the calling thread's priority: `SCHED_IDLE`, else nice 19.
/// Returns which one it got.
#[cfg(target_os = "linux")]
fn lower_priority() -> &'static str {
    // SAFETY: plain syscalls on the calling thread with valid arguments.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        // On Linux, pid 0 is the calling thread.
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 {
            return "SCHED_IDLE";
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 19) == 0 {
            return "nice 19";
        }
    }
    "normal"
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() -> &'static str {
    "normal"
}

/// Reads and parses a split file.
pub fn read_split_file(path: &Path) -> Result<SplitFile, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The splits `file` gives `endpoints`, or why it is not valid: every
/// endpoint with generations named, no other.
pub fn splits_of(endpoints: &[Arc<Generations>], file: &SplitFile) -> Result<Vec<Split>, String> {
    for name in file.keys() {
        if !endpoints.iter().any(|g| g.endpoint == *name) {
            return Err(format!("no endpoint with generations named `{name}`"));
        }
    }
    endpoints
        .iter()
        .map(|g| match file.get(&g.endpoint) {
            Some(weights) => g.split_of(weights),
            None => Err(format!("endpoint `{}`: no weights", g.endpoint)),
        })
        .collect()
}

/// Puts `file`'s weights in force on every endpoint at once, or none.
pub fn apply_split_file(endpoints: &[Arc<Generations>], file: &SplitFile) -> Result<(), String> {
    let splits = splits_of(endpoints, file)?;
    for (g, split) in endpoints.iter().zip(splits) {
        g.set_split(split);
    }
    Ok(())
}

/// Reload errors of the split file, for `/metrics`.
#[derive(Default)]
pub struct SplitReloads {
    pub errors: AtomicU64,
    pub reloads: AtomicU64,
}

/// Identity of a file's content as seen through its path (links followed:
/// a kubelet ConfigMap update swaps a `..data` link).
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// Re-reads `path` when it changes (checked once a second) or on SIGHUP and
/// swaps the new split in; an invalid file keeps the split in force, is
/// logged once per bad content and counted.
pub fn watch_split_file(
    path: PathBuf,
    endpoints: Vec<Arc<Generations>>,
    reloads: Arc<SplitReloads>,
) {
    tokio::spawn(async move {
        let mut seen = stamp(&path);
        let mut last_bad: Option<Vec<u8>> = None;
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let forced = {
                let hup = async {
                    match hangup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = hup => true,
                    () = tokio::time::sleep(Duration::from_secs(1)) => false,
                }
            };
            #[cfg(not(unix))]
            let forced = {
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            };
            let now = stamp(&path);
            if !forced && now == seen {
                continue;
            }
            seen = now;
            let content = std::fs::read(&path).unwrap_or_default();
            let result =
                read_split_file(&path).and_then(|file| apply_split_file(&endpoints, &file));
            match result {
                Ok(()) => {
                    last_bad = None;
                    reloads.reloads.fetch_add(1, Ordering::Relaxed);
                    crate::log::info(format_args!(
                        "split file {}: new weights in force",
                        path.display()
                    ));
                }
                Err(reason) => {
                    reloads.errors.fetch_add(1, Ordering::Relaxed);
                    if last_bad.as_ref() != Some(&content) {
                        crate::log::warn(format_args!(
                            "split file {}: {reason}; the previous weights stay in force",
                            path.display()
                        ));
                        last_bad = Some(content);
                    }
                }
            }
        }
    });
}

/// Appends the per-generation metrics of `endpoints`.
pub fn render_metrics(out: &mut String, endpoints: &[Arc<Generations>], reloads: &SplitReloads) {
    if endpoints.is_empty() {
        return;
    }
    let counter = |out: &mut String,
                   name: &str,
                   help: &str,
                   kind: &str,
                   shadows: Option<bool>,
                   value: &dyn Fn(&Generation) -> String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for gens in endpoints {
            for g in &gens.list {
                if shadows.is_some_and(|s| s != g.shadow) {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{name}{{endpoint=\"{}\",generation=\"{}\"}} {}",
                    esc(&gens.endpoint),
                    esc(&g.name),
                    value(g)
                );
            }
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    counter(
        out,
        "mesh_generation_weight",
        "Percent of the traffic each serving generation gets under the split in force.",
        "gauge",
        Some(false),
        &|g| {
            endpoints
                .iter()
                .flat_map(|e| e.weights())
                .find(|(name, _)| *name == g.name)
                .map_or(0, |(_, w)| w)
                .to_string()
        },
    );
    counter(
        out,
        "mesh_generation_requests_total",
        "Predictions (items) scored by each generation; a shadow's are the copies it scored.",
        "counter",
        None,
        &|g| load(&g.stats.requests),
    );
    counter(
        out,
        "mesh_generation_errors_total",
        "Predictions (items) of each generation that failed.",
        "counter",
        None,
        &|g| load(&g.stats.errors),
    );
    let _ = writeln!(
        out,
        "# HELP mesh_generation_latency_seconds Latency of the requests each serving generation answered."
    );
    let _ = writeln!(out, "# TYPE mesh_generation_latency_seconds histogram");
    for gens in endpoints {
        for g in &gens.list {
            let labels = format!(
                "endpoint=\"{}\",generation=\"{}\"",
                esc(&gens.endpoint),
                esc(&g.name)
            );
            g.stats
                .latency
                .render(out, "mesh_generation_latency_seconds", &labels);
        }
    }
    counter(
        out,
        "mesh_shadow_compared_total",
        "Predictions a shadow generation scored and compared with the serving generation's answer.",
        "counter",
        Some(true),
        &|g| load(&g.stats.compared),
    );
    counter(
        out,
        "mesh_shadow_agreed_total",
        "Compared predictions where the shadow's label equals the served one.",
        "counter",
        Some(true),
        &|g| load(&g.stats.agreed),
    );
    counter(
        out,
        "mesh_shadow_probability_abs_diff_sum",
        "Sum of the mean absolute differences of the class probabilities (divide by compared for the mean).",
        "counter",
        Some(true),
        &|g| g.stats.abs_diff_sum().to_string(),
    );
    counter(
        out,
        "mesh_shadow_cpu_seconds_total",
        "CPU time a shadow generation's scoring thread used (kept within limits.shadow_cpu of a core).",
        "counter",
        Some(true),
        &|g| (g.stats.cpu_nanos.load(Ordering::Relaxed) as f64 / 1e9).to_string(),
    );
    counter(
        out,
        "mesh_shadow_queued",
        "Request copies waiting in a shadow's queue (at most limits.shadow_queue).",
        "gauge",
        Some(true),
        &|g| g.stats.queued.load(Ordering::Relaxed).max(0).to_string(),
    );
    counter(
        out,
        "mesh_shadow_dropped_total",
        "Predictions a shadow dropped unscored: its queue was full, or the machine too busy to score them.",
        "counter",
        Some(true),
        &|g| load(&g.stats.dropped),
    );
    let _ = writeln!(
        out,
        "# HELP mesh_split_reload_errors_total Split file reads that were not valid (the previous weights stayed in force)."
    );
    let _ = writeln!(out, "# TYPE mesh_split_reload_errors_total counter");
    let _ = writeln!(
        out,
        "mesh_split_reload_errors_total {}",
        reloads.errors.load(Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_buckets_are_fixed_and_spread() {
        // Fixed forever: changing these moves every key of every user.
        assert_eq!(key_bucket(b"C00001"), 8775);
        assert_eq!(key_bucket(b"42"), 2476);
        assert_eq!(key_bucket(b""), 4342);
        let mut counts = [0u32; 10];
        for i in 0..100_000 {
            counts[(key_bucket(format!("C{i:05}").as_bytes()) / 1000) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn random_draws_are_uniform() {
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[(random_bucket() / 1000) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn moving_weight_moves_only_the_border_buckets() {
        let a = Split::new(vec![90, 10]);
        let b = Split::new(vec![80, 20]);
        assert_eq!(a.ends, vec![9000, 10_000]);
        assert_eq!(b.ends, vec![8000, 10_000]);
    }
}
