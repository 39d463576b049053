//! The host's log (`tracing`, to stderr): text by default, one JSON object per line with
//! `LOG_FORMAT=json`. `RUST_LOG` filters it (default `info,russh=warn`).

use std::io::IsTerminal;

/// Environment variable choosing the log format: `text` (default) or `json`.
pub const LOG_FORMAT_VAR: &str = "LOG_FORMAT";
/// The filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,russh=warn";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `LOG_FORMAT`'s value; `Err` says what is wrong with it (the operator's setting).
pub fn parse_format(value: Option<&str>) -> Result<LogFormat, String> {
    match value.map(str::trim) {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!(
            "{LOG_FORMAT_VAR}={other:?} is not a log format; use text or json"
        )),
    }
}

/// Installs the process's log subscriber as `LOG_FORMAT` says.
pub fn init() -> Result<(), String> {
    let format = parse_format(std::env::var(LOG_FORMAT_VAR).ok().as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats() {
        assert_eq!(parse_format(None), Ok(LogFormat::Text));
        assert_eq!(parse_format(Some("text")), Ok(LogFormat::Text));
        assert_eq!(parse_format(Some("json")), Ok(LogFormat::Json));
        let e = parse_format(Some("xml")).unwrap_err();
        assert!(e.contains("text or json"), "{e}");
    }
}
