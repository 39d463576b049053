//! Text lines for an SSH session's terminal: the URL banner, one line per request, denials.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Lines queued for a session's terminal; beyond this, lines are dropped rather than
/// letting a client that does not read slow the HTTP edge down.
pub const SESSION_OUTPUT_QUEUE: usize = 256;
/// Longest line queued for a session's terminal, in bytes; longer ones are cut (a request
/// path can be long), so the queue holds at most 256 KiB per session.
pub const SESSION_OUTPUT_LINE_MAX: usize = 1024;

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

    /// Queues a line; never waits (a full queue drops the line). A line over
    /// [`SESSION_OUTPUT_LINE_MAX`] bytes is cut, ending in `…`.
    pub fn line(&self, text: impl Into<String>) {
        let mut text = text.into();
        if text.len() > SESSION_OUTPUT_LINE_MAX {
            let mut end = SESSION_OUTPUT_LINE_MAX - '…'.len_utf8();
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        let _ = self.tx.try_send(text);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_a_full_queue_drops_lines() {
        let (output, mut sink) = SessionOutput::new();
        output.line("é".repeat(SESSION_OUTPUT_LINE_MAX));
        let line = sink.rx.recv().await.unwrap();
        assert!(line.len() <= SESSION_OUTPUT_LINE_MAX, "{}", line.len());
        assert!(line.ends_with('…'));
        for i in 0..SESSION_OUTPUT_QUEUE + 10 {
            output.line(format!("line {i}"));
        }
        let mut queued = 0;
        while sink.rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, SESSION_OUTPUT_QUEUE);
    }
}
