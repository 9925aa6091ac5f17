//! Locking: one apply or destroy of a stack and environment at a time.
//!
//! The lock is a file created exclusively under `<stack>/.mesh/<env>/lock`,
//! naming its holder: it guards this machine. Where the environment's backend
//! can hold a lock everyone shares (a Lease on the cluster, see
//! `Provider::lock`), that is taken too, after the file. A lock left by a
//! killed run is broken deliberately with `mesh unlock` (a Lease also lapses
//! a minute after its last renewal).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub command: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
}

impl Holder {
    /// `` `mesh apply` (pid 7 on ci) since 2026-11-18T11:06:40Z``.
    pub fn describe(&self) -> String {
        format!(
            "`{}` (pid {} on {}) since {}",
            self.command,
            self.pid,
            self.host,
            format_time(self.since)
        )
    }
}

/// Whether the holder may still be running: always for another host; on
/// this one, whether its process exists.
pub fn holder_running(h: &Holder) -> bool {
    h.host != hostname() || Path::new(&format!("/proc/{}", h.pid)).exists()
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds the lock.
    #[error("stack {stack} (environment {env}) is locked by `{}` (pid {} on {}) since {}{}\n  help: wait for it to finish; if that run was killed, break the lock with `mesh unlock {path} --env {env}`",
        holder.command, holder.pid, holder.host, format_time(holder.since), if *alive { "" } else { " — that process is no longer running" })]
    Held {
        stack: String,
        env: String,
        path: String,
        holder: Box<Holder>,
        alive: bool,
    },
    #[error("cannot create the lock file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lock")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC time of a Unix timestamp.
pub fn format_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Unix seconds of an RFC 3339 UTC time (`2026-11-26T08:50:46Z`, fractions
/// of a second and `+00:00` accepted); `None` for anything else.
pub fn parse_time(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let time = time
        .strip_suffix('Z')
        .or_else(|| time.strip_suffix("+00:00"))?;
    let time = time.split('.').next()?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since the epoch from a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The holder this process would be.
pub fn this_holder(command: &str) -> Holder {
    Holder {
        pid: std::process::id(),
        host: hostname(),
        command: command.to_owned(),
        since: now(),
    }
}

/// Takes the lock or says who holds it.
pub fn acquire(
    state_dir: &Path,
    stack: &str,
    env: &str,
    stack_path: &str,
    command: &str,
) -> Result<Lock, LockError> {
    std::fs::create_dir_all(state_dir).map_err(|source| LockError::Io {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let path = lock_path(state_dir);
    let holder = this_holder(command);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(&serde_json::to_vec_pretty(&holder).unwrap_or_default())
                .map_err(|source| LockError::Io {
                    path: path.clone(),
                    source,
                })?;
            Ok(Lock { path })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing: Holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Holder {
                    pid: 0,
                    host: "unknown".into(),
                    command: "unknown".into(),
                    since: 0,
                });
            let alive = holder_running(&existing);
            Err(LockError::Held {
                stack: stack.to_owned(),
                env: env.to_owned(),
                path: stack_path.to_owned(),
                holder: Box::new(existing),
                alive,
            })
        }
        Err(source) => Err(LockError::Io { path, source }),
    }
}

/// Breaks a lock. Returns who held it, if anyone.
pub fn break_lock(state_dir: &Path) -> Option<Holder> {
    let path = lock_path(state_dir);
    let holder = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    std::fs::remove_file(&path).ok().and(holder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_with_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path(), "s", "local", "stacks/s", "mesh apply").unwrap();
        let err = acquire(dir.path(), "s", "local", "stacks/s", "mesh apply").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("locked by `mesh apply`"), "{msg}");
        assert!(msg.contains("mesh unlock stacks/s --env local"), "{msg}");
        drop(lock);
        assert!(acquire(dir.path(), "s", "local", "stacks/s", "mesh apply").is_ok());
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn parses_what_it_formats_and_kubernetes_micro_times() {
        for t in [0, 951_782_400, 1_795_000_000, 4_102_444_799] {
            assert_eq!(parse_time(&format_time(t)), Some(t), "{}", format_time(t));
        }
        assert_eq!(
            parse_time("2026-11-18T11:06:40.123456Z"),
            Some(1_795_000_000)
        );
        assert_eq!(parse_time("2026-11-18T11:06:40+00:00"), Some(1_795_000_000));
        for bad in [
            "",
            "2026-11-18",
            "2026-13-01T00:00:00Z",
            "2026-11-18T11:06:40+02:00",
            "x-y-zT1:2:3Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
