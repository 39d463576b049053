//! Listening sockets for the edges, with an accept queue sized for bursts.
//!
//! `TcpListener::bind` leaves the kernel's accept queue at 128 connections. A burst larger
//! than that (thousands of SSH clients reconnecting after a restart, a crowd of visitors)
//! overflows it before the accept loop catches up; the kernel then drops SYNs and every
//! dropped client waits a full SYN retransmission (1 s, then 2 s, …) for no reason of its
//! own. A larger queue costs nothing until it is used.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Accept queue length asked of the kernel for every listener (it caps this at
/// `net.core.somaxconn`, 4096 on current Linux).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as `TcpListener::bind`
/// sets it, so a restarted host can bind while old connections sit in TIME_WAIT).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_beyond_128_waiting_connections_is_queued_not_dropped() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // 600 connections complete their handshake while nobody accepts; with the
        // default queue of 128 the rest would wait for SYN retransmissions (1 s and more).
        let started = std::time::Instant::now();
        let mut clients = Vec::new();
        for _ in 0..600 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        assert!(
            started.elapsed() < std::time::Duration::from_millis(900),
            "600 connects took {:?}: SYNs were dropped, the accept queue is short",
            started.elapsed()
        );
        for _ in 0..600 {
            listener.accept().await.unwrap();
        }
    }
}
