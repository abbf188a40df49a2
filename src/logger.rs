//! The VMM's logger: one line per record with a UTC timestamp, level, thread name and
//! message, to stderr or to a file (`--log-file`).
//!
//! Levels mean: error = an operation the user asked for failed; warn = a degraded
//! state the VMM worked around; info = lifecycle events with durations; debug =
//! per-exit detail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
    file: Option<Mutex<File>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let line = format!(
            "{}.{:06} {:<5} [{}] {}\n",
            now.as_secs(),
            now.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        );
        match &self.file {
            Some(f) => {
                let _ = crate::devices::bus::lock(f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open log file {path}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("a logger is already installed")]
    AlreadySet,
}

static LOGS_TO_FILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SETTINGS: std::sync::OnceLock<(LevelFilter, Option<std::path::PathBuf>)> =
    std::sync::OnceLock::new();

/// The level and file the logger was set up with, for a re-executed VMM to reuse.
pub fn settings() -> (LevelFilter, Option<std::path::PathBuf>) {
    SETTINGS.get().cloned().unwrap_or((LevelFilter::Warn, None))
}

/// Whether records go to a log file (and so not to the terminal the user watches).
pub fn logs_to_file() -> bool {
    LOGS_TO_FILE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the logger for the process.
pub fn init(level: LevelFilter, file: Option<&Path>) -> Result<(), LoggerError> {
    let _ = SETTINGS.set((level, file.map(Path::to_path_buf)));
    let file = match file {
        Some(path) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggerError::Open {
                    path: path.into(),
                    source,
                })?,
        )),
        None => None,
    };
    LOGS_TO_FILE.store(file.is_some(), std::sync::atomic::Ordering::Relaxed);
    log::set_boxed_logger(Box::new(Logger { level, file })).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}
