//! The terminal view of a run: on a terminal a progress bar (step, loss, ETA) under a line per
//! report (loss, learning rate, tokens/s, memory, ETA) that stays on screen; the same lines alone
//! when stdout is a file or a pipe.

use crate::sinks::Console;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress<'a> {
    bar: Option<ProgressBar>,
    /// Log lines when there is no bar (stdout is a file or a pipe); a closed pipe cannot fail the run.
    console: &'a Console<'a>,
}

pub struct StepReport {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub memory: String,
    pub eta_secs: f64,
    /// More of the step to show (a preference run's reward accuracy and margin).
    pub extra: Option<String>,
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl<'a> Progress<'a> {
    pub fn new(start_step: usize, total: usize, console: &'a Console<'a>) -> Self {
        let bar = (!console.quiet() && !console.is_detached() && std::io::stdout().is_terminal())
            .then(|| {
                let bar =
                    ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stdout());
                bar.set_style(
                    // Narrow enough for an 80-column terminal; the full figures go in a line of
                    // their own above the bar at each report.
                    ProgressStyle::with_template(
                        "{bar:24.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_position(start_step as u64);
                bar
            });
        Self { bar, console }
    }

    /// Prints a line above the bar (or on its own without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => self.console.line(line),
        }
    }

    pub fn step(&self, step: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
        }
    }

    pub fn report(&self, r: &StepReport) {
        // Under 80 columns up to a 20,000-step run at 100k tokens/s.
        let mut line = format!(
            "step {}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  {}  eta {}",
            r.step,
            r.total,
            r.loss,
            r.lr,
            r.tokens_per_s,
            r.memory,
            eta(r.eta_secs)
        );
        if let Some(extra) = &r.extra {
            line = format!("{line}  {extra}");
        }
        match &self.bar {
            // The report stays on screen above the bar, as mlx-lm leaves a line per report.
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(format!("loss {:.4}", r.loss));
                bar.println(line);
            }
            None => self.console.line(&line),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
