//! The one wait loop of the providers: poll a condition until it holds, a
//! deadline passes, or the user presses Ctrl-C, sleeping between polls and
//! showing progress. AWS waits for clusters and NAT gateways, the local
//! target for a runtime to be ready or gone, the Kubernetes provider for a
//! rollout or a deletion: each says how to poll and words its own progress
//! and timeout; the loop is here.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use super::{ApplyContext, ProviderError};
use crate::resource::Address;

/// One poll of a wait.
#[derive(Debug)]
pub(crate) enum Polled<T, S = String> {
    Done(T),
    /// Not yet; the state seen (progress shows it, a timeout returns it).
    Pending(S),
}

/// How often a wait polls: first after `first`, each pause half again as
/// long as the one before, up to `max` (`fixed`: always the same).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Every {
    pub first: Duration,
    pub max: Duration,
}

impl Every {
    pub const fn fixed(interval: Duration) -> Every {
        Every {
            first: interval,
            max: interval,
        }
    }

    #[cfg_attr(not(any(feature = "aws", feature = "kubernetes")), allow(dead_code))]
    pub const fn growing(first: Duration, max: Duration) -> Every {
        Every { first, max }
    }
}

/// What a wait shows while it polls (nothing without an apply to show it in).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Report<'a> {
    /// Nothing.
    Nothing,
    /// After each poll `WHAT: [still ]STATE (Ns so far)`, and `WHAT: done
    /// after Ns` at the end: waits of minutes (AWS).
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    EveryPoll,
    /// `WHAT: STATE` when the state changes, else every 10 s.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    Changes,
    /// This note every 10 s.
    Note(&'a str),
}

/// A wait: what is awaited, for how long, how often it polls, what it shows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Wait<'a> {
    pub what: &'a str,
    pub timeout: Duration,
    pub every: Every,
    pub report: Report<'a>,
}

/// Why a wait ended without its condition.
#[derive(Debug, PartialEq)]
pub(crate) enum Waited<S, E> {
    /// The deadline passed; the last state seen.
    TimedOut(S),
    /// Ctrl-C.
    Interrupted,
    /// A poll failed: polling stopped at once.
    Failed(E),
}

/// How often [`Report::Changes`] and [`Report::Note`] repeat themselves.
const NOTE_EVERY: Duration = Duration::from_secs(10);

/// Polls until `poll` says done, an error, the timeout or Ctrl-C. With an
/// apply (`watch`: its context and the address waited for), progress goes
/// there and Ctrl-C cuts a pause short; without one the wait is silent.
pub(crate) async fn poll_until<T, S, E, F, Fut>(
    wait: &Wait<'_>,
    watch: Option<(&ApplyContext, &Address)>,
    mut poll: F,
) -> Result<T, Waited<S, E>>
where
    S: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Polled<T, S>, E>>,
{
    let started = Instant::now();
    let mut interval = wait.every.first;
    let mut cancel = watch.map(|(ctx, _)| ctx.cancel.clone());
    let cancelled = || watch.is_some_and(|(ctx, _)| ctx.cancelled());
    let show = |message: &str| {
        if let Some((ctx, address)) = watch {
            ctx.progress(address, message);
        }
    };
    let mut last_state: Option<String> = None;
    let mut last_note = started;
    loop {
        let state = match poll().await.map_err(Waited::Failed)? {
            Polled::Done(v) => {
                if let Report::EveryPoll = wait.report {
                    show(&format!(
                        "{}: done after {}s",
                        wait.what,
                        started.elapsed().as_secs()
                    ));
                }
                return Ok(v);
            }
            Polled::Pending(state) => state,
        };
        if cancelled() {
            return Err(Waited::Interrupted);
        }
        if started.elapsed() >= wait.timeout {
            return Err(Waited::TimedOut(state));
        }
        let seen = state.to_string();
        let changed = last_state.as_ref() != Some(&seen);
        let due = last_note.elapsed() > NOTE_EVERY;
        match wait.report {
            Report::Nothing => {}
            Report::EveryPoll => {
                let note = if changed { "" } else { "still " };
                show(&format!(
                    "{}: {note}{seen} ({}s so far)",
                    wait.what,
                    started.elapsed().as_secs()
                ));
            }
            Report::Changes if changed || due => {
                show(&format!("{}: {seen}", wait.what));
                last_note = Instant::now();
            }
            Report::Note(note) if due => {
                show(note);
                last_note = Instant::now();
            }
            Report::Changes | Report::Note(_) => {}
        }
        last_state = Some(seen);
        let pause = tokio::time::sleep(interval);
        match cancel.as_mut() {
            Some(cancel) => tokio::select! {
                _ = pause => {}
                Ok(()) = cancel.changed() => {}
            },
            None => pause.await,
        }
        if cancelled() {
            return Err(Waited::Interrupted);
        }
        interval = interval.mul_f64(1.5).min(wait.every.max);
    }
}

impl<S> Waited<S, ProviderError> {
    /// The provider's error for `address`: a timeout after `timeout`, worded
    /// by `message` from the last state seen.
    pub(crate) fn into_error(
        self,
        address: &Address,
        timeout: Duration,
        message: impl FnOnce(S) -> String,
    ) -> ProviderError {
        match self {
            Waited::TimedOut(last) => ProviderError::Timeout {
                address: address.clone(),
                seconds: timeout.as_secs(),
                message: message(last),
            },
            Waited::Interrupted => ProviderError::Interrupted {
                address: address.clone(),
            },
            Waited::Failed(e) => e,
        }
    }
}

/// Waits during an apply until `poll` says done, showing each poll
/// ([`Report::EveryPoll`]); a timeout names what was awaited and the state
/// it was still in.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub(crate) async fn wait_until<T, F, Fut>(
    ctx: &ApplyContext,
    address: &Address,
    what: &str,
    timeout: Duration,
    every: Every,
    poll: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Polled<T>, ProviderError>>,
{
    let wait = Wait {
        what,
        timeout,
        every,
        report: Report::EveryPoll,
    };
    poll_until(&wait, Some((ctx, address)), poll)
        .await
        .map_err(|w| w.into_error(address, timeout, |last| format!("{what}: still {last}")))
}

/// [`wait_until`] something is gone: `still_there` returns the state of what
/// is left (`Some`), or `None` once nothing is.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub(crate) async fn wait_gone<F, Fut>(
    ctx: &ApplyContext,
    address: &Address,
    what: &str,
    timeout: Duration,
    every: Every,
    mut still_there: F,
) -> Result<(), ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, ProviderError>>,
{
    wait_until(ctx, address, what, timeout, every, || {
        let poll = still_there();
        async move {
            Ok(match poll.await? {
                None => Polled::Done(()),
                Some(status) => Polled::Pending(status),
            })
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Scope;
    use std::cell::Cell;

    /// Guards a test from hanging: no wait here takes a second unless broken.
    const HANG: Duration = Duration::from_secs(30);

    fn context() -> (tokio::sync::watch::Sender<bool>, ApplyContext) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let scope = Scope {
            stack: "s".into(),
            env: "e".into(),
            root: std::env::temp_dir(),
        };
        (tx, ApplyContext::new(scope, &[], rx, false))
    }

    #[tokio::test]
    async fn ready_returns_at_once() {
        let (_tx, ctx) = context();
        let a = Address::of("thing", "a");
        let polls = Cell::new(0);
        // An interval of an hour: a pause before returning would hang.
        let hour = Every::fixed(Duration::from_secs(3600));
        let waited = wait_until(&ctx, &a, "the thing", hour.max, hour, || {
            polls.set(polls.get() + 1);
            async { Ok(Polled::Done(7)) }
        });
        let v = tokio::time::timeout(HANG, waited)
            .await
            .expect("returned without pausing")
            .expect("done");
        assert_eq!((v, polls.get()), (7, 1));
    }

    #[tokio::test]
    async fn the_timeout_names_what_was_awaited_and_the_last_state() {
        let (_tx, ctx) = context();
        let a = Address::of("thing", "a");
        let polls = Cell::new(0);
        let every = Every::fixed(Duration::from_millis(5));
        let waited = wait_until(
            &ctx,
            &a,
            "the thing",
            Duration::from_millis(50),
            every,
            || {
                polls.set(polls.get() + 1);
                let state = format!("pending (poll {})", polls.get());
                async move { Ok::<Polled<()>, _>(Polled::Pending(state)) }
            },
        );
        let err = tokio::time::timeout(HANG, waited)
            .await
            .expect("no hang")
            .expect_err("times out");
        assert!(polls.get() > 1, "polled again before the deadline");
        let last = format!("pending (poll {})", polls.get());
        match err {
            ProviderError::Timeout {
                address, message, ..
            } => {
                assert_eq!(address, a);
                assert_eq!(message, format!("the thing: still {last}"));
            }
            other => panic!("not a timeout: {other}"),
        }
    }

    #[tokio::test]
    async fn an_error_stops_polling() {
        let polls = Cell::new(0);
        let wait = Wait {
            what: "the thing",
            timeout: Duration::from_secs(600),
            every: Every::fixed(Duration::from_millis(5)),
            report: Report::Nothing,
        };
        let waited = poll_until(&wait, None, || {
            polls.set(polls.get() + 1);
            let n = polls.get();
            async move {
                if n < 3 {
                    Ok(Polled::<(), &str>::Pending("starting"))
                } else {
                    Err("broken")
                }
            }
        });
        let r = tokio::time::timeout(HANG, waited).await.expect("no hang");
        assert_eq!(r, Err(Waited::Failed("broken")));
        assert_eq!(polls.get(), 3);
    }

    #[tokio::test]
    async fn ctrl_c_cuts_a_pause_short() {
        let (tx, ctx) = context();
        let a = Address::of("thing", "a");
        let wait = Wait {
            what: "the thing",
            timeout: Duration::from_secs(3600),
            every: Every::fixed(Duration::from_secs(3600)),
            report: Report::Changes,
        };
        // Ctrl-C while the first pause (an hour) is on.
        let press = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(true).expect("still waiting");
            tx
        });
        let polls = Cell::new(0);
        let waited = poll_until(&wait, Some((&ctx, &a)), || {
            polls.set(polls.get() + 1);
            async { Ok::<Polled<(), &str>, ()>(Polled::Pending("starting")) }
        });
        let r = tokio::time::timeout(HANG, waited).await.expect("no hang");
        assert_eq!(r, Err(Waited::Interrupted));
        assert_eq!(polls.get(), 1);
        press.await.expect("pressed");
    }
}
