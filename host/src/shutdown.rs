//! The host-wide stop signal: [`server`](crate::server) raises it on SIGTERM/SIGINT, the edges
//! stop accepting and drain.

use tokio::sync::watch;

/// Raises the stop signal.
pub struct StopSender(watch::Sender<bool>);

/// Waits for the stop signal; cloned into every task that must react to it.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

/// A new stop signal, not raised.
pub fn channel() -> (StopSender, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopSender(tx), Stop(rx))
}

impl StopSender {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Stop {
    /// Resolves once the host is stopping (at once if it already is, or if the sender is gone).
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
