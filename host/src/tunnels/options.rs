//! Tunnel options from the owner: `ssh -R 80:localhost:3000 host -- allow=203.0.113.0/24
//! auth=alice:secret https-only` sends the words after `--` as the session's command. The
//! host checks their shape (not their meaning: that is the plugins'), hashes `auth`
//! passwords at once, and hands the accepted options to the request policies as facts for
//! every request to the connection's tunnels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::password::PasswordHash;

/// Most options one connection may set.
pub const MAX_OPTIONS: usize = 16;
/// Longest option key.
pub const MAX_OPTION_KEY_LEN: usize = 32;
/// Longest option value, in bytes.
pub const MAX_OPTION_VALUE_LEN: usize = 256;
/// Bare words accepted as flags (an option without `=`); anything else needs `key=value`.
pub const FLAGS: [&str; 1] = ["https-only"];
/// How long a request to a new tunnel waits for its connection's options to arrive: OpenSSH
/// sends the command right after the forwards, so a request in between waits instead of
/// slipping past an `allow=` or `auth=` the owner asked for. Tunnels older than this
/// (including `ssh -N`, which sends no command) never wait.
pub const OPTIONS_SETTLE_WAIT: Duration = Duration::from_secs(1);

/// Accepted options, in the order given: (key, value); flags have an empty value.
pub type OptionList = Arc<[(String, String)]>;

/// What the host made of the owner's words.
#[derive(Debug, Default)]
pub struct ParsedOptions {
    pub accepted: Vec<(String, String)>,
    /// The word (passwords masked) and why it was refused.
    pub refused: Vec<(String, String)>,
}

impl ParsedOptions {
    /// The lines echoed to the owner: what was accepted (passwords masked) and refused.
    pub fn echo(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.accepted.is_empty() {
            let shown: Vec<String> = self
                .accepted
                .iter()
                .map(|(k, v)| match (k.as_str(), v.is_empty()) {
                    ("auth", _) => format!("auth={}:***", v.split(':').next().unwrap_or("")),
                    (_, true) => k.clone(),
                    (_, false) => format!("{k}={v}"),
                })
                .collect();
            lines.push(format!("options accepted: {}", shown.join(" ")));
        }
        for (word, why) in &self.refused {
            lines.push(format!("option refused: {word}: {why}"));
        }
        lines
    }
}

/// True if `line` (a session command) is a list of tunnel options rather than a command:
/// its first word is `key=value` or a known flag.
pub fn looks_like_options(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .is_some_and(|first| first.contains('=') || FLAGS.contains(&first))
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_OPTION_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Masks the password of an `auth=` word for messages.
fn shown(word: &str) -> String {
    match word.strip_prefix("auth=") {
        Some(rest) => format!("auth={}:***", rest.split(':').next().unwrap_or("")),
        None => word.chars().take(MAX_OPTION_KEY_LEN + 32).collect(),
    }
}

/// Checks one `auth=user:password` value and returns `user:<hash>`.
fn hash_auth(value: &str) -> Result<String, String> {
    let (user, password) = value.split_once(':').ok_or("use auth=<user>:<password>")?;
    if user.is_empty() || !user.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err("the user name must be printable ASCII without ':'".into());
    }
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(format!("{user}:{}", PasswordHash::create(password)))
}

/// Parses the words of a session command into options.
pub fn parse(line: &str) -> ParsedOptions {
    let mut parsed = ParsedOptions::default();
    for word in line.split_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let refused = |why: String| (shown(word), why);
        let outcome = if parsed.accepted.len() >= MAX_OPTIONS {
            Err(format!("at most {MAX_OPTIONS} options"))
        } else if !valid_key(key) {
            Err(format!(
                "an option is key=value with a key of a-z, 0-9 and '-' (at most {MAX_OPTION_KEY_LEN})"
            ))
        } else if !word.contains('=') && !FLAGS.contains(&key) {
            Err(format!("not a flag; use {key}=<value>"))
        } else if value.len() > MAX_OPTION_VALUE_LEN {
            Err(format!("the value is over {MAX_OPTION_VALUE_LEN} bytes"))
        } else if value.chars().any(char::is_control) {
            Err("the value has control characters".into())
        } else if key == "auth" {
            hash_auth(value).map(|hashed| (key.to_string(), hashed))
        } else {
            Ok((key.to_string(), value.to_string()))
        };
        match outcome {
            Ok(option) => parsed.accepted.push(option),
            Err(why) => parsed.refused.push(refused(why)),
        }
    }
    parsed
}

/// The options of one SSH connection, shared by its tunnels. Unsettled until the
/// connection sends its command (or shell request); see [`OPTIONS_SETTLE_WAIT`].
pub struct SessionOptions {
    tx: watch::Sender<Option<OptionList>>,
    /// The owner key's tier in the operator's key list (not an option the owner chose, but
    /// carried the same way: per connection, to every request fact of its tunnels).
    tier: Option<Arc<str>>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions::for_tier(None)
    }
}

impl SessionOptions {
    /// No options yet, for a key of `tier`.
    pub fn for_tier(tier: Option<Arc<str>>) -> Self {
        SessionOptions {
            tx: watch::Sender::new(None),
            tier,
        }
    }

    /// The owner key's tier, if the key list gives it one.
    pub fn tier(&self) -> Option<&str> {
        self.tier.as_deref()
    }

    /// Sets the options (replacing earlier ones) and settles them.
    pub fn set(&self, options: Vec<(String, String)>) {
        self.tx.send_replace(Some(options.into()));
    }

    /// Settles with no options, unless some were set.
    pub fn settle(&self) {
        self.tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(Arc::from(Vec::new()));
                true
            } else {
                false
            }
        });
    }

    /// The options for a request to a tunnel opened at `opened`: waits for them while the
    /// tunnel is younger than [`OPTIONS_SETTLE_WAIT`], then takes what there is.
    pub async fn current(&self, opened: Instant) -> OptionList {
        if let Some(options) = self.tx.borrow().as_ref() {
            return options.clone();
        }
        let deadline = opened + OPTIONS_SETTLE_WAIT;
        let mut rx = self.tx.subscribe();
        let waited = tokio::time::timeout_at(deadline.into(), rx.wait_for(|o| o.is_some())).await;
        match waited {
            Ok(Ok(options)) => options.clone().unwrap_or_else(|| Arc::from(Vec::new())),
            _ => Arc::from(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_passwords_hashed() {
        let parsed =
            parse("allow=203.0.113.0/24 auth=alice:secret https-only Bad=1 verbose x=\u{7}");
        let keys: Vec<&str> = parsed.accepted.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["allow", "auth", "https-only"]);
        let auth = &parsed.accepted[1].1;
        assert!(auth.starts_with("alice:sha256:"), "{auth}");
        assert!(!auth.contains("secret"));
        let hash = PasswordHash::parse(auth.strip_prefix("alice:").unwrap()).unwrap();
        assert!(hash.verify(b"secret"));
        assert_eq!(parsed.refused.len(), 3, "{:?}", parsed.refused);
        let echo = parsed.echo().join("\n");
        assert!(
            echo.contains("auth=alice:***") && !echo.contains("secret"),
            "{echo}"
        );
        assert!(echo.contains("option refused: verbose"), "{echo}");
    }

    #[test]
    fn refused_auth_never_echoes_the_password() {
        let parsed = parse("auth=:hunter2 auth=bob:");
        assert!(parsed.accepted.is_empty());
        assert!(!parsed.echo().join("\n").contains("hunter2"));
    }

    #[test]
    fn options_are_bounded() {
        let line = (0..40)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(" ");
        let parsed = parse(&line);
        assert_eq!(parsed.accepted.len(), MAX_OPTIONS);
        assert_eq!(parsed.refused.len(), 40 - MAX_OPTIONS);
        let long = format!("k={}", "v".repeat(MAX_OPTION_VALUE_LEN + 1));
        assert!(parse(&long).accepted.is_empty());
    }

    #[test]
    fn commands_are_not_options() {
        assert!(looks_like_options("allow=10.0.0.0/8"));
        assert!(looks_like_options("https-only auth=a:b"));
        for command in ["info", "scan --json", "token", "help", ""] {
            assert!(!looks_like_options(command), "{command}");
        }
    }

    #[tokio::test]
    async fn requests_wait_briefly_for_options_of_a_new_tunnel() {
        let options = Arc::new(SessionOptions::default());
        let opened = Instant::now();
        let setter = options.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            setter.set(vec![("allow".into(), "10.0.0.0/8".into())]);
        });
        assert_eq!(options.current(opened).await.len(), 1);
        // An old tunnel with unsettled options does not wait.
        let unsettled = SessionOptions::default();
        let old = Instant::now() - OPTIONS_SETTLE_WAIT * 2;
        let started = Instant::now();
        assert!(unsettled.current(old).await.is_empty());
        assert!(started.elapsed() < OPTIONS_SETTLE_WAIT);
    }
}
