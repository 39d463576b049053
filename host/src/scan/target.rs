//! TEMPORARY interface stub; replaced by the real target rules (branch wt-scan-checks).
#![allow(dead_code, unused_variables)]
use std::net::IpAddr;
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{target} resolves to {ip}, a {range} address")] Forbidden { target: String, ip: IpAddr, range: &'static str },
    #[error("{target} is not in the operator's scan allowlist")] NotAllowlisted { target: String },
    #[error("{target} does not resolve: {detail}")] Unresolvable { target: String, detail: String },
    #[error("{0:?} is not a host name or IP address")] Malformed(String),
}
#[derive(Clone, Debug, Default)]
pub struct TargetAllowlist { entries: Vec<String> }
impl TargetAllowlist {
    pub fn parse(entries: &[String]) -> Result<TargetAllowlist, String> { Ok(TargetAllowlist { entries: entries.to_vec() }) }
    pub fn is_empty(&self) -> bool { self.entries.is_empty() }
}
pub fn special_range(ip: IpAddr) -> Option<&'static str> { None }
pub async fn resolve_pinned(target: &str, allowlist: &TargetAllowlist) -> Result<IpAddr, TargetError> { Err(TargetError::NotAllowlisted { target: target.into() }) }
