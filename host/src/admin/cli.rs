//! `p0rt admin …`: the admin API from the command line.
