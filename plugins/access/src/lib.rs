//! `access`: the tunnel owner's access options, and the operator's, for each HTTP request.
//!
//! The owner passes options when connecting (`ssh -R 80:localhost:3000 host -- allow=… …`):
//!
//! - `allow=CIDR[,CIDR…]` (may repeat): only clients in one of the networks are admitted;
//! - `deny=CIDR[,CIDR…]` (may repeat): clients in these networks get 403;
//! - `https-only`: plain-http requests are redirected (308) to the same URL over https;
//! - `auth=user:password` (may repeat): HTTP basic auth; the host hashes the password before
//!   the plugin sees it and checks the visitor's credentials itself;
//! - `host=NAME`: the `Host` the backend sees;
//! - `set-header=Name:Value`, `remove-header=Name` (may repeat): request header edits;
//! - `response-header=Name:Value` (may repeat): response header edits.
//!
//! A bare address in a list means one host (/32 or /128). Other option keys are left to other
//! plugins. A malformed option refuses every request with a 403 naming it: the owner meant to
//! restrict or shape access, so serving the tunnel without it would fail open.
//!
//! The operator's sidecar (`access.json`; every field optional, unknown fields refused):
//!
//! ```json
//! { "deny": ["192.0.2.0/24"], "allow": [], "realm": "p0rt",
//!   "response_headers": { "x-served-by": "p0rt" }, "owner_options": true }
//! ```
//! `deny` and a non-empty `allow` apply to every tunnel, before the owner's rules;
//! `response_headers` are set on every admitted response (after the owner's, so they win);
//! `realm` names the login prompt; `owner_options: false` ignores the owners' options.
//!
//! Order: operator deny/allow, owner deny/allow, `https-only`, `auth`, then admit with edits.

// Natively (unit tests) the component glue is left out, so its callees look unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod cidr;
mod rules;

/// The component glue. Only built for wasm, so the rules can be unit-tested natively.
#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use crate::rules::{self, Config, Facts, Outcome};

    wit_bindgen::generate!({ path: "../../wit/v0.2", world: "request-policy-plugin" });

    use exports::p0rt::policy::request_policy::{
        Answer, BasicAuth, Edits, Guest, HeaderEdit, Redirect, RequestFacts, Verdict,
    };

    thread_local! {
        static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    }

    fn header_edits(edits: Vec<rules::Edit>) -> Vec<HeaderEdit> {
        edits
            .into_iter()
            .map(|edit| HeaderEdit {
                name: edit.name,
                value: edit.value,
            })
            .collect()
    }

    fn wit_edits(edits: rules::Edits) -> Edits {
        Edits {
            request: header_edits(edits.request),
            response: header_edits(edits.response),
        }
    }

    struct Access;

    impl Guest for Access {
        fn needs_check(options: Vec<(String, String)>) -> bool {
            CONFIG.with(|config| rules::needs_check(&config.borrow(), &options))
        }

        fn check(request: RequestFacts) -> Verdict {
            let facts = Facts {
                client_ip: &request.client_ip,
                host: &request.host,
                path: &request.path,
                scheme: &request.scheme,
                options: &request.options,
            };
            match CONFIG.with(|config| rules::decide(&config.borrow(), &facts)) {
                Outcome::Admit(edits) => Verdict::Admit(wit_edits(edits)),
                Outcome::Deny { status, body } => Verdict::Deny(Answer {
                    status,
                    headers: Vec::new(),
                    body,
                }),
                Outcome::Redirect { status, location } => {
                    Verdict::Redirect(Redirect { status, location })
                }
                Outcome::RequireAuth {
                    realm,
                    users,
                    edits,
                } => Verdict::RequireAuth(BasicAuth {
                    realm,
                    users,
                    edits: wit_edits(edits),
                }),
            }
        }
    }

    impl exports::p0rt::policy::init::Guest for Access {
        fn init(config: String) -> Result<(), String> {
            let parsed = Config::parse(&config)?;
            CONFIG.with(|c| *c.borrow_mut() = parsed);
            Ok(())
        }
    }

    export!(Access);
}
