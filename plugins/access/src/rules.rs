//! The access rules as plain Rust (no generated bindings), so they are unit-tested natively.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::cidr::{Cidr, any_contains, parse_list, quote};

/// Realm of the login prompt when the operator does not set one.
pub const DEFAULT_REALM: &str = "p0rt";
/// Status of every refusal (operator rules, owner rules, invalid owner options).
const FORBIDDEN: u16 = 403;
/// Status of the `https-only` redirect (keeps the method and body, unlike 301/302).
const HTTPS_REDIRECT: u16 = 308;
/// Headers no edit may touch: they frame the message or the connection, which the host
/// manages; an edit to them could break the exchange, or be refused by the host as a bad
/// verdict and count against the plugin (on every tunnel, for one owner's option).
const RESERVED_HEADERS: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The operator's sidecar (`access.json`), as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    deny: Vec<String>,
    allow: Vec<String>,
    realm: String,
    response_headers: BTreeMap<String, String>,
    owner_options: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            deny: Vec::new(),
            allow: Vec::new(),
            realm: DEFAULT_REALM.to_string(),
            response_headers: BTreeMap::new(),
            owner_options: true,
        }
    }
}

/// The operator's configuration, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    /// Clients never admitted.
    deny: Vec<Cidr>,
    /// If non-empty, the only clients admitted.
    allow: Vec<Cidr>,
    realm: String,
    /// Set on every admitted response, after the owner's (the operator's win).
    response_headers: Vec<(String, String)>,
    /// False: the tunnel owners' options are ignored.
    owner_options: bool,
}

impl Default for Config {
    /// What `{}` means (the sidecar's defaults live in one place, [`RawConfig`]).
    fn default() -> Self {
        Config::parse("{}").expect("the default configuration is valid")
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("access config: {e}"))?;
        let mut deny = Vec::new();
        for entry in &raw.deny {
            deny.push(Cidr::parse(entry).map_err(|why| config_entry("deny", entry, &why))?);
        }
        let mut allow = Vec::new();
        for entry in &raw.allow {
            allow.push(Cidr::parse(entry).map_err(|why| config_entry("allow", entry, &why))?);
        }
        // It is sent quoted in `WWW-Authenticate`, and the host takes no escapes there.
        if let Some(bad) = raw
            .realm
            .chars()
            .find(|c| !(' '..='~').contains(c) || *c == '"' || *c == '\\')
        {
            return Err(format!(
                "access config: the realm must be printable ASCII without '\"' or '\\' \
                 (found {bad:?})"
            ));
        }
        let mut response_headers = Vec::new();
        for (name, value) in raw.response_headers {
            check_header(&name, Some(&value))
                .map_err(|why| format!("access config: response_headers: {why}"))?;
            response_headers.push((name, value));
        }
        Ok(Config {
            deny,
            allow,
            realm: raw.realm,
            response_headers,
            owner_options: raw.owner_options,
        })
    }
}

/// Why an entry of the operator's lists is refused.
fn config_entry(list: &str, entry: &str, why: &str) -> String {
    format!("access config: {list} entry {}: {why}", quote(entry))
}

/// What the plugin needs of a request.
pub struct Facts<'a> {
    pub client_ip: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub scheme: &'a str,
    pub options: &'a [(String, String)],
}

/// One header edit: `None` removes the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edits {
    pub request: Vec<Edit>,
    pub response: Vec<Edit>,
}

/// The verdict, mirroring the WIT variant.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Admit(Edits),
    Deny {
        status: u16,
        body: String,
    },
    Redirect {
        status: u16,
        location: String,
    },
    RequireAuth {
        realm: String,
        users: Vec<(String, String)>,
        edits: Edits,
    },
}

fn forbidden(body: String) -> Outcome {
    Outcome::Deny {
        status: FORBIDDEN,
        body: format!("403 forbidden: {body}\n"),
    }
}

/// The tunnel owner's options this plugin acts on, gathered in one pass.
#[derive(Debug, Default)]
struct OwnerRules {
    deny: Vec<Cidr>,
    allow: Vec<Cidr>,
    https_only: bool,
    users: Vec<(String, String)>,
    /// In the order given, then the last `host=` (the only host edit).
    request: Vec<Edit>,
    response: Vec<Edit>,
}

/// Why an owner option cannot be used. Never echoes header values or password hashes (the
/// message goes to every visitor); CIDR entries are echoed to help the owner.
fn invalid_option(key: &str, why: &str) -> String {
    format!("the tunnel owner's option `{key}` is invalid ({why})")
}

/// True for an HTTP token (RFC 9110 `tchar`s), the syntax of header names.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks an edit's name and value; the host would refuse a bad one and blame the plugin.
fn check_header(name: &str, value: Option<&str>) -> Result<(), String> {
    if !is_token(name) {
        return Err(format!("{} is not a header name", quote(name)));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!("{name} is managed by the host"));
    }
    if let Some(value) = value {
        // Visible ASCII, spaces and tabs (and UTF-8 text): no CR, LF or other controls.
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!("the value of {name} contains a control character"));
        }
    }
    Ok(())
}

/// A `Host` value: a DNS name or an IP literal, optionally with a port.
fn is_host(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// `Name:Value` of `set-header` and `response-header`.
fn header_pair<'a>(key: &str, value: &'a str) -> Result<(&'a str, &'a str), String> {
    let (name, header_value) = value
        .split_once(':')
        .ok_or_else(|| invalid_option(key, "expected Name:Value"))?;
    let (name, header_value) = (name.trim(), header_value.trim());
    check_header(name, Some(header_value)).map_err(|why| invalid_option(key, &why))?;
    Ok((name, header_value))
}

impl OwnerRules {
    fn gather(options: &[(String, String)]) -> Result<OwnerRules, String> {
        let mut rules = OwnerRules::default();
        let mut host = None;
        for (key, value) in options {
            match key.as_str() {
                "allow" => parse_list(value, &mut rules.allow)
                    .map_err(|why| invalid_option("allow", &format!("entry {why}")))?,
                "deny" => parse_list(value, &mut rules.deny)
                    .map_err(|why| invalid_option("deny", &format!("entry {why}")))?,
                "https-only" => rules.https_only = true,
                "auth" => {
                    let (user, hash) = value
                        .split_once(':')
                        .ok_or_else(|| invalid_option("auth", "expected user:password"))?;
                    if user.is_empty() {
                        return Err(invalid_option("auth", "empty user name"));
                    }
                    // The host hashes the password before plugins see it; anything else is
                    // a host or configuration fault, and must not become a usable login.
                    if !hash.starts_with("sha256:") {
                        return Err(invalid_option("auth", "password not hashed by the host"));
                    }
                    rules.users.push((user.to_string(), hash.to_string()));
                }
                "host" => {
                    if !is_host(value) {
                        return Err(invalid_option("host", "not a host name"));
                    }
                    host = Some(value);
                }
                "set-header" => {
                    let (name, header_value) = header_pair(key, value)?;
                    rules.request.push(Edit {
                        name: name.to_string(),
                        value: Some(header_value.to_string()),
                    });
                }
                "remove-header" => {
                    let name = value.trim();
                    check_header(name, None).map_err(|why| invalid_option(key, &why))?;
                    if name.eq_ignore_ascii_case("host") {
                        return Err(invalid_option(key, "the Host header cannot be removed"));
                    }
                    rules.request.push(Edit {
                        name: name.to_string(),
                        value: None,
                    });
                }
                "response-header" => {
                    let (name, header_value) = header_pair(key, value)?;
                    rules.response.push(Edit {
                        name: name.to_string(),
                        value: Some(header_value.to_string()),
                    });
                }
                // Options for other plugins.
                _ => {}
            }
        }
        if let Some(host) = host {
            rules.request.push(Edit {
                name: "host".to_string(),
                value: Some(host.clone()),
            });
        }
        Ok(rules)
    }
}

/// The client's address; `None` if the host sent something unparsable.
fn client_address(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

/// True if a client is refused by a deny list, or by a non-empty allow list it is not in. An
/// unknown address (the host should never send one) is refused by either kind of list: the
/// lists' authors meant to restrict access.
fn refused(deny: &[Cidr], allow: &[Cidr], client: Option<IpAddr>) -> bool {
    let denied = !deny.is_empty() && client.is_none_or(|ip| any_contains(deny, ip));
    let not_allowed = !allow.is_empty() && !client.is_some_and(|ip| any_contains(allow, ip));
    denied || not_allowed
}

/// Whether requests to tunnels with `options` need a decision at all: not when there are no
/// operator rules and no owner options to apply (then every request is admitted unchanged).
pub fn needs_check(config: &Config, options: &[(String, String)]) -> bool {
    !config.deny.is_empty()
        || !config.allow.is_empty()
        || !config.response_headers.is_empty()
        || (config.owner_options && !options.is_empty())
}

/// The decision for one request.
pub fn decide(config: &Config, facts: &Facts) -> Outcome {
    let owner_options = config.owner_options && !facts.options.is_empty();
    let needs_address = !config.deny.is_empty() || !config.allow.is_empty() || owner_options;
    let client = if needs_address {
        client_address(facts.client_ip)
    } else {
        None
    };

    // How the client is named in refusals (the text comes from the host; keep it short).
    let shown = if client.is_some() {
        facts.client_ip
    } else {
        "your address"
    };
    if refused(&config.deny, &config.allow, client) {
        return forbidden(format!("{shown} is not allowed here"));
    }

    let operator_response = || {
        config.response_headers.iter().map(|(name, value)| Edit {
            name: name.clone(),
            value: Some(value.clone()),
        })
    };
    if !owner_options {
        // The common case: nothing to interpret.
        return Outcome::Admit(Edits {
            request: Vec::new(),
            response: operator_response().collect(),
        });
    }

    // A malformed option refuses the request: the owner meant to restrict or shape access,
    // and serving the tunnel without that would be the wrong way to fail.
    let mut rules = match OwnerRules::gather(facts.options) {
        Ok(rules) => rules,
        Err(why) => return forbidden(why),
    };
    if refused(&rules.deny, &rules.allow, client) {
        return forbidden(format!("{shown} is not allowed by the tunnel owner"));
    }
    if rules.https_only && facts.scheme == "http" {
        if !is_host(facts.host) {
            return forbidden("this tunnel is served over https only".to_string());
        }
        // Origin-form only; anything else (`*`, an absolute URL) goes to the root.
        let path = if facts.path.starts_with('/') {
            facts.path
        } else {
            "/"
        };
        return Outcome::Redirect {
            status: HTTPS_REDIRECT,
            location: format!("https://{}{path}", facts.host),
        };
    }
    rules.response.extend(operator_response());
    let edits = Edits {
        request: rules.request,
        response: rules.response,
    };
    if !rules.users.is_empty() {
        return Outcome::RequireAuth {
            realm: config.realm.clone(),
            users: rules.users,
            edits,
        };
    }
    Outcome::Admit(edits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn decide_for(config: &Config, ip: &str, scheme: &str, list: &[(&str, &str)]) -> Outcome {
        let options = options(list);
        decide(
            config,
            &Facts {
                client_ip: ip,
                host: "app.example.net",
                path: "/a?b=1",
                scheme,
                options: &options,
            },
        )
    }

    fn set(name: &str, value: &str) -> Edit {
        Edit {
            name: name.into(),
            value: Some(value.into()),
        }
    }

    fn body_of(outcome: Outcome) -> String {
        match outcome {
            Outcome::Deny { status: 403, body } => body,
            other => panic!("expected a 403, got {other:?}"),
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
        let c = Config::parse(
            r#"{"deny": ["192.0.2.0/24"], "allow": ["::/0", "10.0.0.1"], "realm": "staff",
                "response_headers": {"x-served-by": "p0rt"}, "owner_options": false}"#,
        )
        .unwrap();
        assert_eq!(c.deny.len(), 1);
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.realm, "staff");
        assert!(!c.owner_options);
        for bad in [
            r#"{"denied": []}"#,
            r#"{"deny": ["192.0.2.0/33"]}"#,
            r#"{"allow": ["nope"]}"#,
            r#"{"realm": "a\"b"}"#,
            r#"{"realm": "caf\u00e9"}"#,
            r#"{"response_headers": {"bad name": "x"}}"#,
            r#"{"response_headers": {"x": "a\r\nb"}}"#,
            r#"{"response_headers": {"Content-Length": "1"}}"#,
            r#"{"deny": "192.0.2.0/24"}"#,
        ] {
            assert!(Config::parse(bad).is_err(), "{bad} should be refused");
        }
        let err = Config::parse(r#"{"deny": ["10.0.0.0/8", "10.0.0.0/99"]}"#).unwrap_err();
        assert!(err.contains("10.0.0.0/99"), "{err}");
    }

    #[test]
    fn no_options_admits_with_operator_headers() {
        let config = Config::parse(r#"{"response_headers": {"x-a": "1"}}"#).unwrap();
        assert_eq!(
            decide_for(&config, "198.51.100.1", "http", &[]),
            Outcome::Admit(Edits {
                request: vec![],
                response: vec![set("x-a", "1")],
            })
        );
        // Unknown options belong to other plugins.
        assert_eq!(
            decide_for(&Config::default(), "198.51.100.1", "http", &[("ttl", "5")]),
            Outcome::Admit(Edits::default())
        );
    }

    #[test]
    fn operator_lists() {
        let config =
            Config::parse(r#"{"deny": ["192.0.2.0/24"], "allow": ["192.0.0.0/8"]}"#).unwrap();
        assert!(body_of(decide_for(&config, "192.0.2.5", "https", &[])).contains("192.0.2.5"));
        body_of(decide_for(&config, "10.0.0.1", "https", &[]));
        body_of(decide_for(&config, "not-an-ip", "https", &[]));
        assert!(matches!(
            decide_for(&config, "192.1.0.1", "https", &[]),
            Outcome::Admit(_)
        ));
        // The operator's rules apply even when owner options are ignored.
        let config =
            Config::parse(r#"{"deny": ["192.0.2.0/24"], "owner_options": false}"#).unwrap();
        body_of(decide_for(&config, "192.0.2.5", "https", &[]));
        assert_eq!(
            decide_for(
                &config,
                "10.0.0.1",
                "http",
                &[("deny", "0.0.0.0/0"), ("https-only", "")]
            ),
            Outcome::Admit(Edits::default())
        );
    }

    #[test]
    fn owner_allow_and_deny() {
        let c = Config::default();
        let allow = [
            ("allow", "203.0.113.0/24"),
            ("allow", "2001:db8::/32, 10.1.2.3"),
        ];
        for ok in [
            "203.0.113.9",
            "2001:db8::5",
            "10.1.2.3",
            "::ffff:203.0.113.1",
        ] {
            assert!(
                matches!(decide_for(&c, ok, "https", &allow), Outcome::Admit(_)),
                "{ok}"
            );
        }
        assert_eq!(
            body_of(decide_for(&c, "10.1.2.4", "https", &allow)),
            "403 forbidden: 10.1.2.4 is not allowed by the tunnel owner\n"
        );
        let deny = [("deny", "203.0.113.7"), ("allow", "203.0.113.0/24")];
        body_of(decide_for(&c, "203.0.113.7", "https", &deny));
        assert!(matches!(
            decide_for(&c, "203.0.113.8", "https", &deny),
            Outcome::Admit(_)
        ));
        let body = body_of(decide_for(
            &c,
            "203.0.113.8",
            "https",
            &[("allow", "203.0.113.0/40")],
        ));
        assert!(body.contains("\"203.0.113.0/40\""), "{body}");
        body_of(decide_for(&c, "203.0.113.8", "https", &[("deny", "")]));
    }

    #[test]
    fn only_rules_or_options_need_a_check() {
        let plain = Config::default();
        let owner = [("allow".to_string(), "10.0.0.0/8".to_string())];
        assert!(!needs_check(&plain, &[]));
        assert!(needs_check(&plain, &owner));
        let ignoring = Config::parse(r#"{"owner_options": false}"#).unwrap();
        assert!(!needs_check(&ignoring, &owner));
        for config in [
            r#"{"deny": ["192.0.2.0/24"]}"#,
            r#"{"allow": ["192.0.2.0/24"]}"#,
            r#"{"response_headers": {"x-served-by": "p0rt"}}"#,
        ] {
            assert!(
                needs_check(&Config::parse(config).unwrap(), &[]),
                "{config}"
            );
        }
    }

    #[test]
    fn https_only_redirects_plain_http() {
        let c = Config::default();
        assert_eq!(
            decide_for(&c, "192.0.2.1", "http", &[("https-only", "")]),
            Outcome::Redirect {
                status: 308,
                location: "https://app.example.net/a?b=1".into()
            }
        );
        assert!(matches!(
            decide_for(&c, "192.0.2.1", "https", &[("https-only", "")]),
            Outcome::Admit(_)
        ));
        // Access rules come first: a refused client is not told where to go.
        let both = [("allow", "10.0.0.0/8"), ("https-only", "")];
        body_of(decide_for(&c, "192.0.2.1", "http", &both));
    }

    #[test]
    fn auth_collects_users_and_keeps_edits() {
        let c = Config::parse(r#"{"realm": "team", "response_headers": {"x-op": "1"}}"#).unwrap();
        let opts = [
            ("auth", "alice:sha256:s1:aa"),
            ("response-header", "x-owner: 2"),
            ("auth", "bob:sha256:s2:bb"),
            ("host", "internal.local:8080"),
        ];
        assert_eq!(
            decide_for(&c, "192.0.2.1", "https", &opts),
            Outcome::RequireAuth {
                realm: "team".into(),
                users: vec![
                    ("alice".into(), "sha256:s1:aa".into()),
                    ("bob".into(), "sha256:s2:bb".into())
                ],
                edits: Edits {
                    request: vec![set("host", "internal.local:8080")],
                    response: vec![set("x-owner", "2"), set("x-op", "1")],
                },
            }
        );
        for bad in ["alice", ":sha256:s:aa", "alice:plaintext"] {
            body_of(decide_for(&c, "192.0.2.1", "https", &[("auth", bad)]));
        }
        let body = body_of(decide_for(
            &c,
            "192.0.2.1",
            "https",
            &[("auth", "alice:secret")],
        ));
        assert!(!body.contains("secret"), "{body}");
    }

    #[test]
    fn header_options_become_edits() {
        let opts = [
            ("set-header", "X-Env: staging"),
            ("host", "first.example"),
            ("remove-header", "Cookie"),
            ("host", "second.example"),
            ("response-header", "Cache-Control:no-store"),
        ];
        assert_eq!(
            decide_for(&Config::default(), "192.0.2.1", "https", &opts),
            Outcome::Admit(Edits {
                request: vec![
                    set("X-Env", "staging"),
                    Edit {
                        name: "Cookie".into(),
                        value: None
                    },
                    set("host", "second.example"),
                ],
                response: vec![set("Cache-Control", "no-store")],
            })
        );
        for bad in [
            ("set-header", "no colon"),
            ("set-header", "bad name: x"),
            ("set-header", "x-a: one\ntwo"),
            ("set-header", "Transfer-Encoding: chunked"),
            ("remove-header", "host"),
            ("remove-header", ""),
            ("response-header", "x-a: a\rtwo"),
            ("host", "evil.example/path"),
            ("host", ""),
        ] {
            let body = body_of(decide_for(&Config::default(), "192.0.2.1", "https", &[bad]));
            assert!(body.contains(&format!("`{}`", bad.0)), "{body}");
            assert!(!body.contains("two") && !body.contains('\r'), "{body}");
        }
    }
}
