//! Signals a one-shot command reacts to: SIGINT (a terminal's Ctrl-C) and SIGTERM
//! (`kill`, `timeout`, a service manager).

use anyhow::Context;
use tokio::signal::unix::Signal;
use tokio::signal::unix::SignalKind;
use tokio::signal::unix::signal;

/// SIGINT (a terminal's Ctrl-C) and SIGTERM (`kill`, `timeout`, a service manager),
/// watched from [`Interrupts::watch`] on by one stream each, so a signal stays pending
/// until [`Interrupts::recv`] is polled: a command that must clean up after itself
/// (cancel its job, remove a half-written image) watches before it creates anything.
/// It used to watch from its progress loop's first turn: a signal before that killed
/// the process and left the target, or, where SIGINT came in ignored (a script's
/// background job), was lost and the backup ran to its end. Like
/// qemu-storage-daemon's handlers, these replace an inherited SIG_IGN.
pub struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
}

impl Interrupts {
    pub fn watch() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        })
    }

    /// The next signal, as the words a message gives it. Cancel-safe.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupted",
            _ = self.terminate.recv() => "terminated",
        }
    }
}
