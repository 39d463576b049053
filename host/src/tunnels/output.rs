//! Text lines for an SSH session's terminal: the URL banner, one line per request, denials.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Lines queued for a session's terminal; beyond this, lines are dropped rather than
/// letting a client that does not read slow the HTTP edge down.
pub const SESSION_OUTPUT_QUEUE: usize = 256;
/// Longest line queued for a session's terminal, in bytes; longer ones are cut (a request
/// path can be long), so the queue holds at most 256 KiB per session.
pub const SESSION_OUTPUT_LINE_MAX: usize = 1024;
/// Capacity an emptied queue keeps; a burst's larger buffer is given back.
const KEPT_CAPACITY: usize = 16;

/// The queue between the session's tunnels and its terminal. A plain deque rather than a
/// tokio mpsc channel: every SSH connection has one, most never attach a terminal (`ssh -N`),
/// and a channel allocates its first block of 32 slots (and a cache-padded header) up front,
/// about 1.5 KB per idle connection; this costs about 100 bytes plus the lines it holds.
struct Queue {
    state: Mutex<State>,
    /// A line was queued, or the last sender went away.
    ready: Notify,
}

struct State {
    lines: VecDeque<String>,
    /// Live [`SessionOutput`] clones; the sink ends once none is left and the queue is empty.
    senders: usize,
    /// The sink is gone: lines are dropped.
    closed: bool,
}

impl Queue {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side, cloned into every tunnel of the session. Lines sent before the client
/// opens its session channel are kept and shown when it does.
pub struct SessionOutput {
    queue: Arc<Queue>,
}

impl Clone for SessionOutput {
    fn clone(&self) -> Self {
        self.queue.state().senders += 1;
        SessionOutput {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for SessionOutput {
    fn drop(&mut self) {
        let last = {
            let mut state = self.queue.state();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.queue.ready.notify_one();
        }
    }
}

impl SessionOutput {
    /// Creates the output and the sink that writes it to the session channel once attached.
    pub fn new() -> (SessionOutput, SessionOutputSink) {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                lines: VecDeque::new(),
                senders: 1,
                closed: false,
            }),
            ready: Notify::new(),
        });
        (
            SessionOutput {
                queue: queue.clone(),
            },
            SessionOutputSink { queue },
        )
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
        {
            let mut state = self.queue.state();
            if state.closed || state.lines.len() >= SESSION_OUTPUT_QUEUE {
                return;
            }
            state.lines.push_back(text);
        }
        self.queue.ready.notify_one();
    }
}

/// The receiving end of [`SessionOutput`]; [`SessionOutputSink::run`] writes to the terminal.
pub struct SessionOutputSink {
    queue: Arc<Queue>,
}

impl Drop for SessionOutputSink {
    fn drop(&mut self) {
        let mut state = self.queue.state();
        state.closed = true;
        state.lines = VecDeque::new();
    }
}

impl SessionOutputSink {
    /// The next line; `None` once every sender is gone and the queue is empty.
    async fn next(&self) -> Option<String> {
        loop {
            {
                let mut state = self.queue.state();
                if let Some(line) = state.lines.pop_front() {
                    if state.lines.is_empty() && state.lines.capacity() > KEPT_CAPACITY {
                        state.lines.shrink_to(KEPT_CAPACITY);
                    }
                    return Some(line);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // A line queued after the check above left a permit: this returns at once.
            self.queue.ready.notified().await;
        }
    }

    /// Writes queued lines to the session channel's `terminal` until the session ends.
    /// `crlf`: the client has a terminal, which needs `\r\n` line ends. The writer waits for
    /// the channel's SSH window, so a client that stops reading its terminal only fills this
    /// queue (and loses lines), never the SSH session's shared outbound buffer.
    pub async fn run(self, mut terminal: impl AsyncWrite + Unpin, crlf: bool) {
        while let Some(line) = self.next().await {
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

    fn try_next(sink: &SessionOutputSink) -> Option<String> {
        sink.queue.state().lines.pop_front()
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_a_full_queue_drops_lines() {
        let (output, sink) = SessionOutput::new();
        output.line("é".repeat(SESSION_OUTPUT_LINE_MAX));
        let line = sink.next().await.unwrap();
        assert!(line.len() <= SESSION_OUTPUT_LINE_MAX, "{}", line.len());
        assert!(line.ends_with('…'));
        for i in 0..SESSION_OUTPUT_QUEUE + 10 {
            output.line(format!("line {i}"));
        }
        let mut queued = 0;
        while try_next(&sink).is_some() {
            queued += 1;
        }
        assert_eq!(queued, SESSION_OUTPUT_QUEUE);
    }

    #[tokio::test]
    async fn the_sink_ends_after_the_last_sender_and_its_lines() {
        let (output, sink) = SessionOutput::new();
        let other = output.clone();
        output.line("one");
        drop(output);
        let (mut terminal, mut log) = tokio::io::duplex(1024);
        let later = async move {
            tokio::task::yield_now().await;
            other.line("two");
        };
        let run = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sink.run(&mut terminal, false),
        );
        let (ended, ()) = tokio::join!(run, later);
        ended.expect("the sink ends once every sender is gone");
        drop(terminal);
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut log, &mut text)
            .await
            .unwrap();
        assert_eq!(text, "one\ntwo\n");
    }

    #[tokio::test]
    async fn lines_after_the_sink_is_gone_are_dropped() {
        let (output, sink) = SessionOutput::new();
        drop(sink);
        output.line("lost");
        assert!(output.queue.state().lines.is_empty());
    }
}
