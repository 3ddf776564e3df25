//! Signals the commands stop on: SIGINT (a terminal's Ctrl-C) and SIGTERM (`kill`,
//! `timeout`, a service manager), and for the daemon SIGHUP too, as
//! qemu-storage-daemon.

use anyhow::Context;
use tokio::signal::unix::Signal;
use tokio::signal::unix::SignalKind;
use tokio::signal::unix::signal;

/// The stop signals, watched from [`Interrupts::watch`] on by one stream each, so a
/// signal stays pending until [`Interrupts::recv`] is polled: a command that must
/// clean up after itself (cancel its job, remove a half-written image, close a qcow2
/// so its bitmaps are stored) watches before it creates anything. Commands used to
/// watch only once they were running: a signal before that killed the process and
/// left the target, or, where SIGINT came in ignored (a script's background job),
/// was lost and the backup ran to its end. Like qemu-storage-daemon's handlers, these
/// replace an inherited SIG_IGN.
pub struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
    hangup: Option<Signal>,
}

impl Interrupts {
    /// SIGINT and SIGTERM.
    pub fn watch() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            hangup: None,
        })
    }

    /// SIGINT, SIGTERM and SIGHUP (the daemon's set).
    pub fn watch_with_hangup() -> anyhow::Result<Interrupts> {
        let mut interrupts = Self::watch()?;
        interrupts.hangup = Some(signal(SignalKind::hangup()).context("cannot watch SIGHUP")?);
        Ok(interrupts)
    }

    /// The next signal, as the words a message gives it. Cancel-safe.
    pub async fn recv(&mut self) -> &'static str {
        let hangup = async {
            match &mut self.hangup {
                Some(hangup) => hangup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => "interrupted",
            _ = self.terminate.recv() => "terminated",
            _ = hangup => "hung up",
        }
    }
}
