//! Text lines for an SSH session's terminal: the URL banner, one line per request, denials.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Lines queued for a session's terminal; beyond this, lines are dropped rather than
/// letting a client that does not read slow the HTTP edge down.
pub const SESSION_OUTPUT_QUEUE: usize = 256;

/// The sending side, cloned into every tunnel of the session. Lines sent before the client
/// opens its session channel are kept and shown when it does.
#[derive(Clone)]
pub struct SessionOutput {
    tx: mpsc::Sender<String>,
}

impl SessionOutput {
    /// Creates the output and the sink that writes it to the session channel once attached.
    pub fn new() -> (SessionOutput, SessionOutputSink) {
        let (tx, rx) = mpsc::channel(SESSION_OUTPUT_QUEUE);
        (SessionOutput { tx }, SessionOutputSink { rx })
    }

    /// Queues a line; never waits (a full queue drops the line).
    pub fn line(&self, text: impl Into<String>) {
        let _ = self.tx.try_send(text.into());
    }
}

/// The receiving end of [`SessionOutput`]; [`SessionOutputSink::run`] writes to the terminal.
pub struct SessionOutputSink {
    rx: mpsc::Receiver<String>,
}

impl SessionOutputSink {
    /// Writes queued lines to the session channel's `terminal` until the session ends.
    /// `crlf`: the client has a terminal, which needs `\r\n` line ends. The writer waits for
    /// the channel's SSH window, so a client that stops reading its terminal only fills this
    /// queue (and loses lines), never the SSH session's shared outbound buffer.
    pub async fn run(mut self, mut terminal: impl AsyncWrite + Unpin, crlf: bool) {
        while let Some(line) = self.rx.recv().await {
            let mut text = if crlf {
                line.replace('\n', "\r\n")
            } else {
                line
            };
            text.push_str(if crlf { "\r\n" } else { "\n" });
            if terminal.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}
