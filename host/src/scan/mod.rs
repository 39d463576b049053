//! Scan jobs: a tunnel owner's check of what their tunnel exposes, queued after the scan
//! policy admits it and run by a bounded worker pool through the HTTP edge.

pub mod checks;
pub mod target;
