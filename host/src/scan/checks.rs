//! What a scan looks at on one tunnel name, through p0rt's own HTTP edge (so it sees what
//! the public sees), and the TCP port check for operator-allowlisted targets.
//! (Being written; see the interface in `scan/mod.rs`.)
