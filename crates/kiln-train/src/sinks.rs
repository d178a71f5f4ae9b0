//! Where a run reports: stdout (log lines, the progress bar) and TensorBoard event files. A sink
//! that fails (stdout piped into `head` and closed, a full disk under the event file) must not
//! kill the run: the failure is warned about once on stderr, the sink goes quiet, and the trainer
//! then checkpoints and stops, or trains on, as `train.on_save_error` says.

use kiln_tensorboard::EventWriter;
use std::cell::RefCell;
use std::io::Write;
use std::path::Path;

/// A warning on stderr that cannot fail the run (stderr may be closed too).
pub fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "warning: {text}");
}

/// The first failure of any sink: what failed, with its cause.
#[derive(Default)]
pub struct SinkFailure(RefCell<Option<String>>);

impl SinkFailure {
    /// Records a failure (the first one counts) and warns once.
    fn record(&self, what: String) {
        let mut slot = self.0.borrow_mut();
        if slot.is_none() {
            warn(&what);
            *slot = Some(what);
        }
    }

    /// What failed first, if anything did.
    pub fn get(&self) -> Option<String> {
        self.0.borrow().clone()
    }
}

/// Log lines on stdout; after a failed write, nothing more is written there.
pub struct Console<'a> {
    quiet: bool,
    broken: std::cell::Cell<bool>,
    failure: &'a SinkFailure,
    detached: Option<Detached>,
}

/// Lines written by a thread of their own. Under `mpirun` stdout is a pipe that mpirun drains;
/// after a Ctrl-C it stops draining it, and a run writing there would block in `write` until
/// mpirun kills it, never reaching the checkpoint it was asked for. A full queue drops lines.
struct Detached {
    lines: Option<std::sync::mpsc::SyncSender<String>>,
    done: std::sync::mpsc::Receiver<()>,
}

/// How long a detached console's end waits for its queued lines to be written.
const DETACHED_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

impl<'a> Console<'a> {
    pub fn new(quiet: bool, failure: &'a SinkFailure) -> Self {
        Self {
            quiet,
            broken: std::cell::Cell::new(false),
            failure,
            detached: None,
        }
    }

    /// A console whose writes never block the run (see [`Detached`]); no progress bar.
    pub fn detached(failure: &'a SinkFailure) -> Self {
        let (lines, queue) = std::sync::mpsc::sync_channel::<String>(1024);
        let (finished, done) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("kiln-console".into())
            .spawn(move || {
                for line in queue {
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
                let _ = finished.send(());
            });
        Self {
            quiet: false,
            broken: std::cell::Cell::new(false),
            failure,
            detached: spawned.ok().map(|_| Detached {
                lines: Some(lines),
                done,
            }),
        }
    }

    /// True when lines go through a thread of their own.
    pub fn is_detached(&self) -> bool {
        self.detached.is_some()
    }

    pub fn line(&self, text: &str) {
        if self.quiet || self.broken.get() {
            return;
        }
        if let Some(d) = &self.detached {
            if let Some(lines) = &d.lines {
                let _ = lines.try_send(text.to_string());
            }
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
            self.broken.set(true);
            self.failure
                .record(format!("writing to stdout failed: {e}"));
        }
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }
}

impl Drop for Console<'_> {
    /// The queued lines are written before the run's own summary follows them, unless stdout
    /// no longer drains.
    fn drop(&mut self) {
        if let Some(d) = &mut self.detached {
            d.lines = None;
            let _ = d.done.recv_timeout(DETACHED_DRAIN);
        }
    }
}

/// TensorBoard events; after a failed write, the event file is closed and no more is written.
pub struct Events<'a> {
    writer: Option<EventWriter>,
    failure: &'a SinkFailure,
}

impl<'a> Events<'a> {
    /// An event file in `dir`, or none when `enabled` is false (or when it cannot be created:
    /// that failure is recorded like any later one).
    pub fn create(dir: &Path, enabled: bool, failure: &'a SinkFailure) -> Self {
        let writer = match enabled.then(|| EventWriter::create(dir)).transpose() {
            Ok(writer) => writer,
            Err(e) => {
                failure.record(crate::error::chain(&e));
                None
            }
        };
        Self { writer, failure }
    }

    /// The event file, while it is being written.
    pub fn path(&self) -> Option<&Path> {
        self.writer.as_ref().map(|w| w.path())
    }

    /// True while events are written (histograms are costly to build for nothing).
    pub fn active(&self) -> bool {
        self.writer.is_some()
    }

    fn with(
        &mut self,
        write: impl FnOnce(&mut EventWriter) -> Result<(), kiln_tensorboard::Error>,
    ) {
        if let Some(w) = self.writer.as_mut()
            && let Err(e) = write(w)
        {
            self.writer = None;
            self.failure.record(crate::error::chain(&e));
        }
    }

    pub fn scalar(&mut self, tag: &str, value: f32, step: usize) {
        self.with(|w| w.add_scalar(tag, value, step as i64));
    }

    pub fn text(&mut self, tag: &str, text: &str, step: usize) {
        self.with(|w| w.add_text(tag, text, step as i64));
    }

    pub fn histogram(&mut self, tag: &str, values: &[f32], step: usize) {
        self.with(|w| w.add_histogram(tag, values, step as i64));
    }

    pub fn flush(&mut self) {
        self.with(|w| w.flush());
    }
}
