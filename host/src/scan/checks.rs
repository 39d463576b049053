//! TEMPORARY interface stub; replaced by the real checks (branch wt-scan-checks).
#![allow(dead_code, unused_variables)]
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check { Reachability, Headers, Paths, Cors, Cookies, Errors, Ports }
impl Check {
    pub const HTTP: [Check; 6] = [Check::Reachability, Check::Headers, Check::Paths, Check::Cors, Check::Cookies, Check::Errors];
    pub fn as_str(self) -> &'static str { match self { Check::Reachability => "reachability", Check::Headers => "headers", Check::Paths => "paths", Check::Cors => "cors", Check::Cookies => "cookies", Check::Errors => "errors", Check::Ports => "ports" } }
    pub fn parse(s: &str) -> Option<Check> { [Check::Reachability, Check::Headers, Check::Paths, Check::Cors, Check::Cookies, Check::Errors, Check::Ports].into_iter().find(|c| c.as_str() == s) }
    pub fn describe(self) -> &'static str { self.as_str() }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity { Info, Low, Medium, High }
impl Severity { pub fn as_str(self) -> &'static str { match self { Severity::Info => "info", Severity::Low => "low", Severity::Medium => "medium", Severity::High => "high" } } }
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding { pub check: Check, pub severity: Severity, pub target: String, pub title: String, pub seen: String, pub why: String, pub fix: String }
pub struct RequestBudget(AtomicU32);
impl RequestBudget { pub fn new(r: u32) -> Self { RequestBudget(AtomicU32::new(r)) } pub fn remaining(&self) -> u32 { self.0.load(Ordering::Relaxed) } }
pub struct HttpProbe { pub edge: SocketAddr, pub host: String, pub name: String, pub request_timeout: Duration }
#[derive(Debug, thiserror::Error)]
pub enum CheckError { #[error("the job's request budget is used up")] BudgetExhausted, #[error("{0} did not answer: {1}")] Unreachable(String, String) }
pub async fn run_http_check(check: Check, probe: &HttpProbe, budget: &RequestBudget) -> Result<Vec<Finding>, CheckError> { Ok(vec![]) }
pub async fn run_port_check(target: &str, ip: IpAddr, ports: &[u16], connect_timeout: Duration, budget: &RequestBudget) -> Result<Vec<Finding>, CheckError> { Ok(vec![]) }
