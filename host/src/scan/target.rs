//! Scan targets outside p0rt's own tunnels: resolved once, checked against special ranges
//! and the operator's allowlist, and pinned for the whole scan.
//! (Being written.)
