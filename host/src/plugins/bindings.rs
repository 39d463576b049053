//! Host-side bindings generated from `wit/policy.wit` (0.1.x) and `wit/v0.2/policy.wit`
//! (0.2.0). The two versions are separate packages to wasmtime (0.x minors are not semver
//! compatible), so each has its own host imports and role worlds; `host_api` implements the
//! 0.2 imports by delegating to the 0.1 ones.
//!
//! The host imports are generated once (world `host`); each role has a host-only world that
//! exports just its policy interface, so the `init` export stays optional: it is looked up
//! separately through the `init` world.

/// The interfaces the host provides to every plugin.
pub mod host {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "p0rt:policy/host",
        imports: { default: async | trappable },
    });
}

/// Bindings for plugins in the naming role.
pub mod naming {
    wasmtime::component::bindgen!({
        path: "../wit",
        inline: "package p0rt:host-bindings;\nworld naming { include p0rt:policy/host@0.1.1; export p0rt:policy/naming@0.1.1; }\n",
        world: "p0rt:host-bindings/naming",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// Bindings for plugins in the rate-limit role.
pub mod rate_limit {
    wasmtime::component::bindgen!({
        path: "../wit",
        inline: "package p0rt:host-bindings;\nworld rate-limit { include p0rt:policy/host@0.1.1; export p0rt:policy/rate-limit@0.1.1; }\n",
        world: "p0rt:host-bindings/rate-limit",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// Bindings for plugins in the scan-admission role.
pub mod scan_admission {
    wasmtime::component::bindgen!({
        path: "../wit",
        inline: "package p0rt:host-bindings;\nworld scan-admission { include p0rt:policy/host@0.1.1; export p0rt:policy/scan-admission@0.1.1; }\n",
        world: "p0rt:host-bindings/scan-admission",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// The optional `init` export.
pub mod init {
    wasmtime::component::bindgen!({
        path: "../wit",
        inline: "package p0rt:host-bindings;\nworld init { export p0rt:policy/init@0.1.1; }\n",
        world: "p0rt:host-bindings/init",
        exports: { default: async },
    });
}

/// The interfaces the host provides to plugins built against 0.2.
pub mod host_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "p0rt:policy/host",
        imports: { default: async | trappable },
    });
}

/// Bindings for plugins in the naming role built against 0.2.
pub mod naming_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        inline: "package p0rt:host-bindings;\nworld naming { include p0rt:policy/host@0.2.0; export p0rt:policy/naming@0.2.0; }\n",
        world: "p0rt:host-bindings/naming",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host_v2::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host_v2::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host_v2::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host_v2::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// Bindings for plugins in the rate-limit role built against 0.2.
pub mod rate_limit_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        inline: "package p0rt:host-bindings;\nworld rate-limit { include p0rt:policy/host@0.2.0; export p0rt:policy/rate-limit@0.2.0; }\n",
        world: "p0rt:host-bindings/rate-limit",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host_v2::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host_v2::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host_v2::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host_v2::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// Bindings for plugins in the scan-admission role built against 0.2.
pub mod scan_admission_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        inline: "package p0rt:host-bindings;\nworld scan-admission { include p0rt:policy/host@0.2.0; export p0rt:policy/scan-admission@0.2.0; }\n",
        world: "p0rt:host-bindings/scan-admission",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host_v2::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host_v2::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host_v2::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host_v2::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// Bindings for plugins in the request-policy role built against 0.2.
pub mod request_policy_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        inline: "package p0rt:host-bindings;\nworld request-policy { include p0rt:policy/host@0.2.0; export p0rt:policy/request-policy@0.2.0; }\n",
        world: "p0rt:host-bindings/request-policy",
        with: {
            "p0rt:policy/cache": crate::plugins::bindings::host_v2::p0rt::policy::cache,
            "p0rt:policy/domains": crate::plugins::bindings::host_v2::p0rt::policy::domains,
            "p0rt:policy/log": crate::plugins::bindings::host_v2::p0rt::policy::log,
            "p0rt:policy/clock": crate::plugins::bindings::host_v2::p0rt::policy::clock,
        },
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// The optional `init` export of 0.2 plugins.
pub mod init_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        inline: "package p0rt:host-bindings;\nworld init { export p0rt:policy/init@0.2.0; }\n",
        world: "p0rt:host-bindings/init",
        exports: { default: async },
    });
}
