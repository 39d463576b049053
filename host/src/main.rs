//! `p0rt`: command-line entry point. All logic lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use p0rt::config::{Config, ServeArgs, StorageKind};
use p0rt::plugins::{Role, tools};

/// Self-hosted SSH reverse-tunnel host whose policies are WebAssembly plugins.
///
/// Users run stock OpenSSH, `ssh -p 2222 -R 80:localhost:3000 <host>`, and get a stable
/// public name such as http://whale-guitar-fox.<domain> bound to their SSH key.
///
/// Settings are layered: built-in defaults < YAML file (--config) < environment < flags.
#[derive(Parser, Debug)]
#[command(name = "p0rt", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the host (the default when no command is given)
    Serve(ServeArgs),
    /// Copy domain records between domains.json and Redis (idempotent; prints counts)
    Migrate {
        /// Where the records go: `redis` (from <data-dir>/domains.json) or `json` (from Redis)
        #[arg(long, value_name = "STORE")]
        to: StorageKind,
        #[command(flatten)]
        settings: ServeArgs,
    },
    /// Tools for policy plugins (WebAssembly components)
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Failed-auth bans: list them, lift one (same store settings as `serve`)
    #[command(subcommand)]
    Security(SecurityCommand),
    /// Names reserved for one SSH key (P0rt's reservations.json or Redis keys; same store
    /// settings as `serve`; a running host sees changes at once)
    #[command(subcommand, visible_alias = "res")]
    Reservation(ReservationCommand),
    /// Steer a running host through its admin API (token from ADMIN_TOKEN; see docs/api.md)
    Admin(p0rt::admin::cli::AdminArgs),
}

#[derive(Subcommand, Debug)]
enum ReservationCommand {
    /// List the reservations
    #[command(visible_alias = "ls")]
    List {
        /// Print P0rt's JSON answer ({"success", "message", "data": [reservations]})
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: ServeArgs,
    },
    /// Reserve NAME for the key with FINGERPRINT (`ssh-keygen -lf KEY.pub` prints it)
    Add {
        name: String,
        fingerprint: String,
        /// A note kept with the reservation (P0rt's third argument)
        #[arg(conflicts_with = "comment")]
        note: Option<String>,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        settings: ServeArgs,
    },
    /// Lift the reservation of NAME
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        #[command(flatten)]
        settings: ServeArgs,
    },
}

#[derive(Subcommand, Debug)]
enum SecurityCommand {
    /// List the bans in force: addresses banned for failed SSH authentication, and the
    /// operator's name and key bans, with until when
    Bans {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: ServeArgs,
    },
    /// Lift the ban of an address (and forget its failures)
    Unban {
        address: std::net::IpAddr,
        #[command(flatten)]
        settings: ServeArgs,
    },
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Validate a plugin: prints its role, p0rt:policy version, sha256 and imports
    Check {
        file: PathBuf,
        /// Role to check it for, when the component implements several
        #[arg(long)]
        role: Option<Role>,
    },
    /// Make one decision with a plugin and print it as JSON
    Run {
        file: PathBuf,
        /// The request, as JSON (fields of the role's WIT record, in snake_case)
        #[arg(long)]
        input: String,
        #[arg(long)]
        role: Option<Role>,
        /// Configuration handed to the plugin's init (JSON); default: its sidecar's
        #[arg(long)]
        config: Option<String>,
    },
    /// List the plugins a host would serve: bundled ones and overrides from a directory
    List {
        /// Plugins directory [default: ./plugins]
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
    },
    /// Create a plugin crate to start from (builds with `cargo component build --release`
    /// or plain cargo for wasm32-wasip2; `test.sh` runs it through `p0rt plugin run`)
    New {
        /// Crate and plugin name (a DNS label: a-z, 0-9, -)
        name: String,
        /// The policy role it fills
        #[arg(long)]
        role: Role,
        /// Directory to create the crate in [default: .]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Measure decision latency (p50/p99) with a warm and with a fresh instance
    Bench {
        file: PathBuf,
        #[arg(long)]
        input: String,
        #[arg(long)]
        role: Option<Role>,
        #[arg(long, default_value_t = 10_000)]
        iterations: usize,
    },
}

/// Exit code for configuration errors (same as for bad command-line flags).
const EXIT_CONFIG: u8 = 2;

/// Free heap memory glibc keeps at the top of an arena before giving it back to the kernel
/// (its default is 128 KiB). A download through a tunnel allocates and frees up to a channel
/// window (2 MiB) of SSH packets over and over; with the default, each round trimmed the
/// arena and faulted the pages back in, ~5 % of the host's CPU on a 100 MiB GET. Twice the
/// window keeps that memory; at most this much stays resident per arena when idle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TRIM_THRESHOLD: usize = 4 * 1024 * 1024;

/// Sets [`MALLOC_TRIM_THRESHOLD`] (glibc only; other allocators keep their own policy).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD as libc::c_int);
    }
}

fn run_migrate(to: StorageKind, settings: ServeArgs) -> ExitCode {
    let (config, runtime) = match prepare(&settings) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match runtime.block_on(p0rt::store::migrate::run(&config, to)) {
        Ok(report) => {
            println!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => exit_for(&e),
    }
}

/// The configuration (from flags and the environment) and a runtime to run with it.
fn prepare(args: &ServeArgs) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::load(args, &|var| std::env::var(var).ok()).map_err(|e| {
        eprintln!("p0rt: configuration error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let runtime = async_runtime().ok_or(ExitCode::FAILURE)?;
    Ok((config, runtime))
}

/// The tokio runtime, or `None` after saying why it could not start.
fn async_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("p0rt: cannot start the async runtime: {e}"))
        .ok()
}

/// Exit code for a failed run: 2 when the operator's settings are at fault, 1 otherwise.
fn exit_for(e: &anyhow::Error) -> ExitCode {
    eprintln!("p0rt: {e:#}");
    if e.downcast_ref::<p0rt::config::SettingsError>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

fn run_security_command(command: SecurityCommand) -> ExitCode {
    let settings = match &command {
        SecurityCommand::Bans { settings, .. } | SecurityCommand::Unban { settings, .. } => {
            settings
        }
    };
    let (config, runtime) = match prepare(settings) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let bans = p0rt::bans::open_for(&config).await?;
        match command {
            SecurityCommand::Bans { json, .. } => p0rt::bans::list_text(&bans, json)
                .await
                .map(|text| (text, true)),
            SecurityCommand::Unban { address, .. } => {
                let lifted = bans.unban(address).await?;
                Ok(if lifted {
                    (format!("{address}: ban lifted\n"), true)
                } else {
                    (format!("{address} is not banned\n"), false)
                })
            }
        }
    });
    match result {
        Ok((text, found)) => {
            print!("{text}");
            if found {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => exit_for(&e),
    }
}

fn run_reservation_command(command: ReservationCommand) -> ExitCode {
    let settings = match &command {
        ReservationCommand::List { settings, .. }
        | ReservationCommand::Add { settings, .. }
        | ReservationCommand::Remove { settings, .. } => settings,
    };
    let (config, runtime) = match prepare(settings) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let admin = p0rt::store::reservations::Admin::open(&config).await?;
        match command {
            ReservationCommand::List { json, .. } => {
                admin.list_text(json).await.map(|text| (text, true))
            }
            ReservationCommand::Add {
                name,
                fingerprint,
                note,
                comment,
                ..
            } => admin
                .add_text(&name, &fingerprint, comment.or(note).as_deref())
                .await
                .map(|text| (text, true)),
            ReservationCommand::Remove { name, .. } => admin.remove_text(&name).await,
        }
    });
    match result {
        Ok((text, found)) => {
            print!("{text}");
            if found {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => exit_for(&e),
    }
}

fn run_plugin_command(command: PluginCommand) -> ExitCode {
    let Some(runtime) = async_runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        match command {
            PluginCommand::Check { file, role } => tools::check(&file, role).await,
            PluginCommand::Run {
                file,
                input,
                role,
                config,
            } => tools::run(&file, role, &input, config).await,
            PluginCommand::List { plugins_dir } => {
                tools::list(&plugins_dir.unwrap_or_else(tools::default_dir)).await
            }
            PluginCommand::Bench {
                file,
                input,
                role,
                iterations,
            } => tools::bench(&file, role, &input, iterations).await,
            PluginCommand::New { name, role, dir } => {
                let parent = dir.unwrap_or_else(|| PathBuf::from("."));
                p0rt::plugins::scaffold::new_plugin(&parent, &name, role).map(|path| {
                    format!(
                        "created {}: cd there and run `cargo component build --release` \
                         (or ./test.sh)\n",
                        path.display()
                    )
                })
            }
        }
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("p0rt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_admin_command(args: &p0rt::admin::cli::AdminArgs) -> ExitCode {
    let Some(runtime) = async_runtime() else {
        return ExitCode::FAILURE;
    };
    let token = std::env::var("ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    match runtime.block_on(p0rt::admin::cli::run(args, token.as_deref())) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("p0rt admin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = p0rt::logs::init() {
        eprintln!("p0rt: configuration error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Plugin(command)) => return run_plugin_command(command),
        Some(Command::Migrate { to, settings }) => return run_migrate(to, settings),
        Some(Command::Security(command)) => return run_security_command(command),
        Some(Command::Reservation(command)) => return run_reservation_command(command),
        Some(Command::Admin(args)) => return run_admin_command(&args),
        None => cli.serve,
    };
    tune_allocator();
    let (config, runtime) = match prepare(&args) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match runtime.block_on(p0rt::server::run(config, args.ready_file.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_for(&e),
    }
}
