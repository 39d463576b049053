use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;

use super::WindowSizeRef;
use crate::ChannelMsg;

/// p0rt patch: data messages queued behind a stalled reader are merged up to this size, so
/// a peer sending tiny packets cannot turn one window of bytes into millions of entries.
const BACKLOG_COALESCE_BYTES: usize = 64 * 1024;
/// p0rt patch: non-data messages (channel requests) queued behind a stalled reader; beyond
/// this a peer is flooding requests on a channel nobody reads, and they are dropped.
const MAX_BACKLOG_REQUESTS: usize = 256;

/// p0rt patch: one per server session. Readers of the session's channels wake its loop
/// through this when they have consumed enough data to return window to the peer, or when
/// their queue has room again for messages backlogged in the session.
#[derive(Debug)]
pub(crate) struct CreditWake {
    pub(crate) notify: Notify,
    /// Consumed bytes worth waking the session for (an eighth of the channel window).
    threshold: u32,
}

impl CreditWake {
    pub(crate) fn new(window_size: u32) -> Arc<Self> {
        Arc::new(Self {
            notify: Notify::new(),
            threshold: (window_size / 8).max(1),
        })
    }
}

/// p0rt patch: flow control for the data a peer sends on one channel.
///
/// Upstream russh returned SSH window to the peer as soon as data arrived and then awaited
/// room in the channel's bounded queue. A reader that stopped reading (one slow HTTP
/// visitor) therefore parked the whole session loop: every other channel, keepalives and
/// rekeying stopped with it. Here the window is returned only for data the reader has
/// taken out of the queue ([`ReceiveCredit::consumed`]), so a stalled reader stops its own
/// channel's peer, and delivery into the queue never waits: what does not fit waits in
/// [`ChannelRef`]'s backlog, which the window bounds.
#[derive(Debug)]
pub(crate) struct ReceiveCredit {
    /// Bytes taken by the reader that the session has not yet returned to the peer.
    consumed: AtomicU32,
    /// The session holds messages for this channel that did not fit in its queue.
    backlogged: AtomicBool,
    wake: Arc<CreditWake>,
}

impl ReceiveCredit {
    /// Called by the reader for each data message it takes out of the queue.
    pub(crate) fn consumed(&self, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let before = self.consumed.fetch_add(bytes, Ordering::AcqRel);
        self.room_made(before < self.wake.threshold && before.saturating_add(bytes) >= self.wake.threshold);
    }

    /// Called by the reader for each message it takes out of the queue.
    pub(crate) fn room_made(&self, credit_due: bool) {
        // Pairs with the fence in `ChannelRef::mark_backlogged`: either the session sees the
        // room this reader made, or this reader sees the backlog flag and wakes it.
        fence(Ordering::SeqCst);
        if credit_due || self.backlogged.load(Ordering::SeqCst) {
            self.wake.notify.notify_one();
        }
    }

    /// Takes the bytes consumed since the last call.
    pub(crate) fn take(&self) -> u32 {
        self.consumed.swap(0, Ordering::AcqRel)
    }
}

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    /// p0rt patch: set for server channels, whose window follows consumption.
    pub(crate) credit: Option<Arc<ReceiveCredit>>,
    /// p0rt patch: messages that did not fit in the reader's queue, in order.
    backlog: VecDeque<ChannelMsg>,
    /// p0rt patch: the peer closed the channel; drop this once the backlog is delivered.
    pub(crate) closed: bool,
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self::with_window(sender, WindowSizeRef::new(0), None)
    }

    /// p0rt patch: a channel whose receive window follows its reader's consumption.
    pub(crate) fn credited(sender: Sender<ChannelMsg>, wake: Arc<CreditWake>) -> Self {
        Self::with_window(sender, WindowSizeRef::new(0), Some(wake))
    }

    pub(crate) fn with_window(
        sender: Sender<ChannelMsg>,
        window_size: WindowSizeRef,
        wake: Option<Arc<CreditWake>>,
    ) -> Self {
        Self {
            sender,
            window_size,
            credit: wake.map(|wake| {
                Arc::new(ReceiveCredit {
                    consumed: AtomicU32::new(0),
                    backlogged: AtomicBool::new(false),
                    wake,
                })
            }),
            backlog: VecDeque::new(),
            closed: false,
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// p0rt patch: hands `msg` to the reader without ever waiting. Returns the data bytes
    /// dropped because the reader is gone (they count as consumed).
    pub(crate) fn deliver(&mut self, msg: ChannelMsg) -> u32 {
        if self.backlog.is_empty() {
            match self.sender.try_send(msg) {
                Ok(()) => return 0,
                Err(TrySendError::Closed(msg)) => return data_len(&msg),
                Err(TrySendError::Full(msg)) => {
                    self.backlog.push_back(msg);
                    return self.mark_backlogged();
                }
            }
        }
        if self.sender.is_closed() {
            return data_len(&msg).saturating_add(self.discard_backlog());
        }
        self.push_backlog(msg);
        0
    }

    /// p0rt patch: [`Self::deliver`] for server channels; an awaited send otherwise.
    pub(crate) async fn deliver_or_send(
        &mut self,
        msg: ChannelMsg,
    ) -> Result<(), tokio::sync::mpsc::error::SendError<ChannelMsg>> {
        if self.credit.is_some() {
            self.deliver(msg);
            Ok(())
        } else {
            self.sender.send(msg).await
        }
    }

    /// p0rt patch: moves backlogged messages into the reader's queue while it has room.
    /// Returns the data bytes dropped because the reader is gone.
    pub(crate) fn drain_backlog(&mut self) -> u32 {
        while let Some(msg) = self.backlog.pop_front() {
            match self.sender.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.backlog.push_front(msg);
                    return 0;
                }
                Err(TrySendError::Closed(msg)) => {
                    return data_len(&msg).saturating_add(self.discard_backlog());
                }
            }
        }
        if let Some(credit) = &self.credit {
            credit.backlogged.store(false, Ordering::SeqCst);
        }
        0
    }

    /// p0rt patch: nothing is waiting for the reader.
    pub(crate) fn backlog_is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    fn mark_backlogged(&mut self) -> u32 {
        if let Some(credit) = &self.credit {
            credit.backlogged.store(true, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        // The reader may have made room before it could see the flag: look once more.
        self.drain_backlog()
    }

    fn discard_backlog(&mut self) -> u32 {
        let dropped = self
            .backlog
            .drain(..)
            .fold(0u32, |sum, msg| sum.saturating_add(data_len(&msg)));
        if let Some(credit) = &self.credit {
            credit.backlogged.store(false, Ordering::SeqCst);
        }
        dropped
    }

    fn push_backlog(&mut self, msg: ChannelMsg) {
        let merged = match (self.backlog.back_mut(), &msg) {
            (Some(ChannelMsg::Data { data: queued }), ChannelMsg::Data { data }) => {
                append(queued, data)
            }
            (
                Some(ChannelMsg::ExtendedData {
                    data: queued,
                    ext: queued_ext,
                }),
                ChannelMsg::ExtendedData { data, ext },
            ) if queued_ext == ext => append(queued, data),
            _ => false,
        };
        if merged {
            return;
        }
        let is_stream = matches!(
            msg,
            ChannelMsg::Data { .. }
                | ChannelMsg::ExtendedData { .. }
                | ChannelMsg::Eof
                | ChannelMsg::Close
        );
        if !is_stream && self.backlog.len() >= MAX_BACKLOG_REQUESTS {
            log::warn!("dropping a channel request queued behind a stalled reader: {msg:?}");
            return;
        }
        self.backlog.push_back(msg);
    }
}

/// Appends `data` to `queued` if the result stays under [`BACKLOG_COALESCE_BYTES`].
fn append(queued: &mut Bytes, data: &Bytes) -> bool {
    if queued.len() + data.len() > BACKLOG_COALESCE_BYTES {
        return false;
    }
    let mut joined = BytesMut::with_capacity(queued.len() + data.len());
    joined.extend_from_slice(queued);
    joined.extend_from_slice(data);
    *queued = joined.freeze();
    true
}

/// The flow-controlled bytes in `msg`.
pub(crate) fn data_len(msg: &ChannelMsg) -> u32 {
    match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
            u32::try_from(data.len()).unwrap_or(u32::MAX)
        }
        _ => 0,
    }
}

impl std::ops::Deref for ChannelRef {
    type Target = Sender<ChannelMsg>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}
